"""DNE against an independent implementation of its ascent, its Dirichlet draws against theory, and its bounds."""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.attacks import synonyms
from advfunc.attacks.dne import dirichlet, project_simplex
from advfunc.attacks.synonyms import two_hop
from tests.support.catalogue import tiny_synonyms
from tests.support.reference_methods import (
    distance_to_hull,
    neighbourhoods,
    reference_dne,
    simplex_projection_by_bisection,
)
from tests.support.tiny_models import padded_batch, tiny_model


def test_dirichlet_draws_have_the_distributions_mean_and_variance():
    alpha = torch.tensor([0.3, 1.0, 2.5, 0.5, 7.0])
    valid = torch.tensor([True, True, True, False, True])
    draws = dirichlet(alpha.expand(40_000, 5), valid.expand(40_000, 5), torch.Generator().manual_seed(0))
    assert torch.all(draws[:, 3] == 0) and torch.all(draws >= 0)
    torch.testing.assert_close(draws.sum(-1), torch.ones(40_000))
    a = alpha[valid]
    total = a.sum()
    mean = a / total
    var = a * (total - a) / (total**2 * (total + 1))
    torch.testing.assert_close(draws[:, valid].mean(0), mean, rtol=0, atol=4 * float((var / 40_000).sqrt().max()))
    torch.testing.assert_close(draws[:, valid].var(0), var, rtol=0.05, atol=0)


def test_projection_onto_the_simplex_matches_bisection():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(200, 7, generator=g) * 3
    valid = torch.rand(200, 7, generator=g) < 0.7
    valid[:, 0] = True
    projected = project_simplex(values, valid)
    for row in range(200):
        keep = valid[row]
        expected = simplex_projection_by_bisection(values[row][keep], int(keep.sum()))
        torch.testing.assert_close(projected[row][keep], expected, rtol=0, atol=1e-5)
        assert torch.all(projected[row][~keep] == 0)


@pytest.mark.parametrize("rows", [7, 4096])  # expanded in blocks of rows, or all at once
def test_two_hop_neighbourhoods_match_a_set_based_expansion(rows, monkeypatch):
    monkeypatch.setattr(synonyms, "ROWS", rows)
    table = tiny_synonyms(width=3)
    ids = torch.arange(120).view(10, 12)
    found = two_hop(table, width=6)
    expected = neighbourhoods(table.ids, table.mask, ids, second_hop_width=6)
    for row, token in enumerate(ids.flatten().tolist()):
        kept = found.mask[token]
        got = list(zip(found.ids[token][kept].tolist(), found.hop[token][kept].tolist(), strict=True))
        assert got == expected[row // 12][row % 12]
    assert bool((found.hop == 2).any())  # the check covers the second hop


def test_delta_and_grads_match_the_reference_ascent_from_the_same_draw():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    table = tiny_synonyms()
    steps, step_size, alpha, decay, width = 2, 0.3, 1.0, 0.5, 8
    grads, out = advfunc.dne(model, table, steps, step_size, alpha, decay, width, torch.Generator().manual_seed(5))(
        advfunc.params_of(model), batch
    )
    delta = advfunc.attacks.dne(model, table, steps, step_size, alpha, decay, width, torch.Generator().manual_seed(5))(
        advfunc.params_of(model), batch
    )
    pairs = neighbourhoods(table.ids, table.mask, batch["input_ids"], second_hop_width=width)
    # The start: the same generator call on the same [B, L, width] concentrations.
    hops = torch.full((*batch["input_ids"].shape, width), 0)
    valid = torch.zeros(*batch["input_ids"].shape, width, dtype=torch.bool)
    for b, row in enumerate(pairs):
        for t, token_pairs in enumerate(row):
            valid[b, t, : len(token_pairs)] = True
            hops[b, t, : len(token_pairs)] = torch.tensor([h for _, h in token_pairs])
    concentration = torch.where(hops == 2, alpha * decay, alpha)
    start = dirichlet(concentration, valid, torch.Generator().manual_seed(5))
    start_lists = [[start[b, t, : len(p)].tolist() for t, p in enumerate(row)] for b, row in enumerate(pairs)]
    expected_delta, expected_grads = reference_dne(model, batch, pairs, start_lists, steps, step_size)
    assert float(expected_delta.abs().max()) > 1e-2
    torch.testing.assert_close(delta, expected_delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.delta, expected_delta, rtol=1e-4, atol=1e-5)
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_delta_is_zero_at_padding_and_at_tokens_without_synonyms():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    table = tiny_synonyms()
    delta = advfunc.attacks.dne(model, table, generator=torch.Generator().manual_seed(0))(
        advfunc.params_of(model), batch
    )
    without = ~table.mask[batch["input_ids"]].any(-1) | ~batch["attention_mask"].bool()
    assert bool(without.any()) and bool((~without).any())
    assert torch.all(delta[without] == 0)
    assert float((delta[~without].norm(dim=-1) > 0).float().mean()) > 0.5  # a token may end at its own vertex


def test_delta_lies_in_the_hull_of_the_two_hop_neighbourhood():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    table = tiny_synonyms()
    delta = advfunc.attacks.dne(model, table, steps=3, width=8, generator=torch.Generator().manual_seed(0))(
        advfunc.params_of(model), batch
    )
    embedding = model.get_input_embeddings().weight.detach()
    pairs = neighbourhoods(table.ids, table.mask, batch["input_ids"], second_hop_width=8)
    checked = 0
    for b, row in enumerate(pairs):
        for t, token_pairs in enumerate(row):
            if batch["attention_mask"][b, t] and len(token_pairs) > 1:
                vertices = embedding[[n for n, _ in token_pairs]]
                point = embedding[token_pairs[0][0]] + delta[b, t]
                assert distance_to_hull(point, vertices) < 1e-4 * float(vertices.norm(dim=1).max())
                checked += any(hop == 2 for _, hop in token_pairs)
    assert checked > 3  # hulls with second-hop vertices were among them


@pytest.mark.parametrize("name", ["ascc", "dne"])
def test_a_given_start_is_refused_naming_it(name):
    model = tiny_model("bert")
    batch = padded_batch("bert")
    attack = getattr(advfunc.attacks, name)(model, tiny_synonyms())
    with pytest.raises(ValueError, match="start="):
        attack(advfunc.params_of(model), batch, start=torch.zeros(4, 12, 32))


@pytest.mark.parametrize(("alpha", "decay"), [(340282347.0, 1e30), (1e-30, 1e-300)])
def test_a_concentration_product_beyond_float32_is_refused_naming_both_factors(alpha, decay):
    # Each factor passes on its own; their product overflows (or underflows) the float32 draw.
    with pytest.raises(ValueError, match=r"alpha · decay .*alpha=.*decay="):
        advfunc.attacks.dne(tiny_model("bert"), tiny_synonyms(), alpha=alpha, decay=decay)


@pytest.mark.slow
def test_compiled_step_equals_eager():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    params = advfunc.params_of(model)
    steps = [
        advfunc.dne(model, tiny_synonyms(), 2, generator=torch.Generator().manual_seed(0), compile=c)
        for c in (False, True)
    ]
    (eager, eager_out), (compiled, compiled_out) = (step(params, batch) for step in steps)
    a = torch.cat([eager[n].flatten() for n in eager])
    c = torch.cat([compiled[n].flatten() for n in eager])
    assert ((a - c).norm() / a.norm()).item() <= 1e-5
    torch.testing.assert_close(compiled_out.delta, eager_out.delta, rtol=1e-4, atol=1e-6)
