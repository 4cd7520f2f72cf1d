"""A non-finite target gradient drops the perturbation instead of poisoning the step."""

from __future__ import annotations

import inspect

import pytest
import torch

import advfunc
from tests.support.catalogue import CATALOGUE, seeded
from tests.support.tiny_models import padded_batch, tiny_model


def poisoned_loss_fn(outputs, batch):
    """The model's loss plus a term whose value is 0 and whose gradient is NaN.

    d√|x − x₀|/dx at x = x₀ is infinite, times the 0 in front: NaN reaches the logits and
    everything before them, whatever a method perturbs (embeddings, a layer's output, weights).
    """
    logits = outputs.logits
    return outputs.loss + (logits - logits.detach()).abs().sqrt().sum() * 0.0


def _delta(out):
    return out.delta if isinstance(out.delta, torch.Tensor) else torch.cat([d.flatten() for d in out.delta.values()])


def _seeded_kwargs(entry):
    return {"generator": seeded(0)} if entry.seeded else {}


# Rerouting's objective reads hidden states, not a loss: no loss_fn to poison.
@pytest.mark.parametrize(
    "name", sorted(n for n, entry in CATALOGUE.items() if "loss_fn" in inspect.signature(entry.factory).parameters)
)
def test_nan_target_gradient_is_skipped(name):
    entry = CATALOGUE[name]
    model = entry.make_model()
    params = advfunc.params_of(model)
    _, out = entry.call(entry.build(model, loss_fn=poisoned_loss_fn), params, entry.make_batch())
    assert bool(out.skipped)
    if entry.aims_with_loss:  # the perturbation came from the NaN gradient: it must be dropped
        delta = _delta(out)
        assert torch.equal(delta, torch.zeros_like(delta))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_finite_clean_gradient_never_becomes_nan(name):
    """With a poisoned target gradient only in the attack, the returned grads equal the clean ones twice over."""
    entry = CATALOGUE[name]
    model = entry.make_model()
    grads, out = entry.call(entry.build(model), advfunc.params_of(model), entry.make_batch())
    assert not bool(out.skipped)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_huge_loss_scale_gives_a_finite_perturbation(name):
    """Gradients whose squared norm overflows fp32 (scale 1e30) still give a unit direction."""
    entry = CATALOGUE[name]
    model = entry.make_model()
    batch = entry.make_batch()
    params = advfunc.params_of(model)
    step = entry.build(model)
    _, plain = entry.call(step, params, batch, **_seeded_kwargs(entry))
    _, scaled = entry.call(step, params, batch, loss_scale=1e30, **_seeded_kwargs(entry))
    assert not bool(scaled.skipped)
    torch.testing.assert_close(_delta(scaled), _delta(plain), rtol=1e-4, atol=1e-6)


def test_fp16_gradient_with_overflowing_square_norm():
    from advfunc.core.norms import l2_direction

    g = torch.full((2, 3, 4), 1000.0, dtype=torch.float16)  # 1000² = 1e6 > fp16 max 65504
    direction, finite = l2_direction(g)
    assert bool(finite) and torch.isfinite(direction).all()
    torch.testing.assert_close(direction.norm(), torch.tensor(1.0))
    direction, _ = l2_direction(g, (1, 2))
    torch.testing.assert_close(direction.flatten(1).norm(dim=1), torch.ones(2))


def test_fp16_model_step_gives_finite_perturbation():
    """A half-precision model: norms in fp32, δ in fp16, finite."""
    model = tiny_model("bert").half()
    batch = padded_batch("bert")
    grads, out = advfunc.pgd(model, epsilon=1.0, alpha=0.5, steps=2, loss_fn=None)(
        advfunc.params_of(model), batch, loss_scale=1024.0
    )
    assert out.delta.dtype == torch.float16
    assert torch.isfinite(out.delta).all() and not bool(out.skipped)
    assert out.delta.float().norm() <= 1.0 + 1e-2
    assert all(g.dtype == torch.float16 for g in grads.values())
