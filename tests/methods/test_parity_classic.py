"""advfunc's FGM, PGD and FreeLB against the classic imperative loops, in lockstep.

Two copies of one model train side by side for three SGD steps on different batches:
one with the classic FGM/PGD/FreeLB classes, one with advfunc's pure step + ``set_grads``. At every
step the gradients must agree to float32 round-off (tests/support/parity.py gives the tolerances).
"""

from __future__ import annotations

import copy

import pytest
import torch

import advfunc
from tests.support.classic_reference import classic_fgm_grads, classic_freelb_grads, classic_pgd_grads
from tests.support.parity import assert_grads_match
from tests.support.tiny_models import EMBEDDING_NAME, padded_batch, tiny_model

STEPS = 3
LR = 0.5  # large enough that the three steps visit clearly different parameters


def lockstep(family, reference, step_factory):
    """Run ``reference(model, batch)`` and advfunc's step side by side; compare every step."""
    classic_model = tiny_model(family)
    func_model = copy.deepcopy(classic_model)
    classic_opt = torch.optim.SGD(classic_model.parameters(), lr=LR)
    func_opt = torch.optim.SGD(func_model.parameters(), lr=LR)
    step = step_factory(func_model)
    for t in range(STEPS):
        batch = padded_batch(family, seed=t)
        expected = reference(classic_model, batch)
        grads, out = step(advfunc.params_of(func_model), batch)
        assert_grads_match(grads, expected, where=f"{family} step {t}")
        assert not bool(out.skipped)
        classic_opt.step()
        advfunc.set_grads(func_model, grads)
        func_opt.step()
        classic_opt.zero_grad()
    # The models moved (the test exercised three different points) and stayed together.
    moved = sum(
        (p - q).abs().sum() for p, q in zip(classic_model.parameters(), tiny_model(family).parameters(), strict=True)
    )
    assert moved > 0


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_fgm_matches_the_classic_class(family):
    lockstep(
        family,
        lambda m, b: classic_fgm_grads(m, b, EMBEDDING_NAME[family], epsilon=1.0),
        lambda m: advfunc.fgm(m, epsilon=1.0),
    )


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_pgd_matches_the_classic_class(family, steps):
    # epsilon below K·alpha so the projection is active on the later steps
    lockstep(
        family,
        lambda m, b: classic_pgd_grads(m, b, EMBEDDING_NAME[family], epsilon=0.5, alpha=0.3, K=steps),
        lambda m: advfunc.pgd(m, epsilon=0.5, alpha=0.3, steps=steps),
    )


FREELB_CASES = [
    # norm, init_mag, max_norm
    ("l2", 0.0, 0.0),
    ("l2", 1.0, 0.0),
    ("l2", 1.0, 0.08),
    ("linf", 0.0, 0.0),
    ("linf", 0.02, 0.03),
]


@pytest.mark.parametrize("norm,init_mag,max_norm", FREELB_CASES)
@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_freelb_matches_official(family, norm, init_mag, max_norm):
    via = "inputs_embeds" if family == "bert" else "hook"
    classic_generator = torch.Generator().manual_seed(7)
    func_generator = torch.Generator().manual_seed(7)
    lockstep(
        family,
        lambda m, b: classic_freelb_grads(m, b, 3, 0.05, init_mag, max_norm, norm, classic_generator, via=via)[0],
        lambda m: advfunc.freelb(
            m, steps=3, lr=0.05, init_mag=init_mag, max_norm=max_norm, norm=norm, generator=func_generator
        ),
    )


def test_freelb_final_delta_matches_official():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    _, expected = classic_freelb_grads(
        copy.deepcopy(model), batch, 3, 0.05, 1.0, 0.08, "l2", torch.Generator().manual_seed(1)
    )
    step = advfunc.freelb(
        model, steps=3, lr=0.05, init_mag=1.0, max_norm=0.08, generator=torch.Generator().manual_seed(1)
    )
    _, out = step(advfunc.params_of(model), batch)
    torch.testing.assert_close(out.delta, expected, rtol=1e-4, atol=1e-6)


def test_pgd_delta_is_the_classic_weight_perturbation():
    """The rows advfunc holds are exactly the classic FGM's change to the embedding matrix."""
    model = tiny_model("bert")
    batch = padded_batch("bert")
    classic_model = copy.deepcopy(model)
    from tests.support.classic_reference import PGD

    pgd = PGD(classic_model, emb_name="word_embeddings", epsilon=0.5, alpha=0.3)
    classic_model.zero_grad()
    classic_model(**batch).loss.backward()
    for t in range(3):
        pgd.attack(is_first_attack=(t == 0))
        if t != 2:
            classic_model.zero_grad()
            classic_model(**batch).loss.backward()
    weight = classic_model.get_input_embeddings().weight.detach()
    classic_delta = weight - pgd.emb_backup["bert.embeddings.word_embeddings.weight"]
    _, out = advfunc.pgd(model, epsilon=0.5, alpha=0.3, steps=3)(advfunc.params_of(model), batch)
    dense = torch.zeros_like(weight)
    used = out.delta_tokens >= 0
    dense[out.delta_tokens[used]] = out.delta[used]
    torch.testing.assert_close(dense, classic_delta, rtol=1e-3, atol=2e-6)
    assert out.delta.shape[0] == batch["input_ids"].numel()  # held as rows, never vocabulary-sized
