"""ASCC against an independent implementation of its reference code, and its bounds."""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.attacks.ascc import entropy_gradient, masked_softmax
from tests.support.catalogue import tiny_synonyms
from tests.support.method_harness import sharpened
from tests.support.reference_methods import distance_to_hull, neighbourhoods, reference_ascc
from tests.support.tiny_models import padded_batch, tiny_model


def test_delta_and_grads_match_the_reference_implementation():
    # Sharpened well past the usual factor: Adam divides each coordinate's gradient by its
    # magnitude + ε, so a tiny head's gradients near ε = 1e-8 would compare round-off.
    model = sharpened(tiny_model("bert"), 100.0)
    batch = padded_batch("bert")
    table = tiny_synonyms()
    steps, lr, sparsity, beta = 3, 0.5, 2.0, 4.0
    delta = advfunc.attacks.ascc(model, table, steps, lr, sparsity)(advfunc.params_of(model), batch)
    grads, out = advfunc.ascc(model, table, steps, lr, sparsity, beta)(advfunc.params_of(model), batch)
    pairs = neighbourhoods(table.ids, table.mask, batch["input_ids"])
    expected_delta, expected_grads = reference_ascc(model, batch, pairs, steps, lr, sparsity, beta)
    assert float(expected_delta.abs().max()) > 1e-2  # the attack moved
    torch.testing.assert_close(delta, expected_delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.delta, expected_delta, rtol=1e-4, atol=1e-5)
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_delta_lies_in_the_hull_of_the_neighbourhood_and_is_zero_where_nothing_substitutes():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    table = tiny_synonyms()
    delta = advfunc.attacks.ascc(model, table, steps=4, lr=2.0)(advfunc.params_of(model), batch)
    embedding = model.get_input_embeddings().weight.detach()
    pairs = neighbourhoods(table.ids, table.mask, batch["input_ids"])
    inside = 0
    for b, row in enumerate(pairs):
        for t, token_pairs in enumerate(row):
            if not batch["attention_mask"][b, t] or len(token_pairs) == 1:
                assert torch.all(delta[b, t] == 0)
                continue
            vertices = embedding[[n for n, _ in token_pairs]]
            point = embedding[token_pairs[0][0]] + delta[b, t]
            assert distance_to_hull(point, vertices) < 1e-4 * float(vertices.norm(dim=1).max())
            # far from the token's own embedding: the hull is not a point
            inside += float(delta[b, t].norm()) > 1e-3
    assert inside > 3
    # A point off the hull is caught by the same measure: the check can fail.
    b, t = next((b, t) for b, row in enumerate(pairs) for t, p in enumerate(row) if len(p) > 1)
    vertices = embedding[[n for n, _ in pairs[b][t]]]
    assert distance_to_hull(vertices.mean(0) + 0.1 * torch.randn(vertices.shape[1]), vertices) > 1e-2


def test_weights_are_on_the_simplex_and_the_entropy_gradient_is_autograds():
    logits = torch.randn(3, 5, 6, dtype=torch.float64)
    valid = torch.rand(3, 5, 6) < 0.6
    valid[..., 0] = True
    w = masked_softmax(logits, valid)
    assert torch.all(w >= 0) and torch.all(w[~valid] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))
    z = logits.clone().requires_grad_(True)
    p = torch.softmax(z.masked_fill(~valid, float("-inf")), -1)
    safe = torch.where(valid, p, torch.ones_like(p))
    (-(safe * safe.log()).sum()).backward()
    torch.testing.assert_close(entropy_gradient(w.double()), z.grad.float().double() * valid, rtol=1e-5, atol=1e-6)


def test_bad_tables_are_refused_naming_the_fault():
    model = tiny_model("bert")
    table = tiny_synonyms()
    with pytest.raises(ValueError, match="rows but the input embedding has"):
        advfunc.attacks.ascc(model, tiny_synonyms(vocab=50))
    with pytest.raises(TypeError, match="SynonymTable"):
        advfunc.attacks.ascc(model, {"good": ["fine"]})
    with pytest.raises(ValueError, match=r"torch\.long"):
        advfunc.attacks.ascc(model, advfunc.attacks.SynonymTable(table.ids.int(), table.mask))
    own = table.ids.clone()
    own[1, 0] = 1
    mask = table.mask.clone()
    mask[1, 0] = True
    with pytest.raises(ValueError, match="its own synonym"):
        advfunc.attacks.ascc(model, advfunc.attacks.SynonymTable(own, mask))
    with pytest.raises(ValueError, match="objective"):
        advfunc.attacks.ascc(model, table, objective="ce")


def test_the_loss_objective_needs_labels_and_ascends_the_loss():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    table = tiny_synonyms()
    params = advfunc.params_of(model)
    delta = advfunc.attacks.ascc(model, table, steps=3, objective="loss", sparsity=0.0)(params, batch)
    loss_at = advfunc.perturbed_loss(model, target="embeds")
    uniform = advfunc.attacks.ascc(model, table, steps=1, lr=1e-6, objective="loss", sparsity=0.0)(params, batch)
    assert float(loss_at(params, batch, delta)) > float(loss_at(params, batch, uniform))
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="labels"):
        advfunc.attacks.ascc(model, table, objective="loss")(params, unlabelled)


@pytest.mark.slow
def test_compiled_attack_equals_eager():
    model = sharpened(tiny_model("bert"), 100.0)  # Adam's ε: see the parity test
    batch = padded_batch("bert")
    eager, compiled = (
        advfunc.attacks.ascc(model, tiny_synonyms(), 2, compile=c)(advfunc.params_of(model), batch)
        for c in (False, True)
    )
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
