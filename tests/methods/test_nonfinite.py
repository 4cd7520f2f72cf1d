"""A non-finite target gradient drops the perturbation instead of poisoning the step."""

from __future__ import annotations

import pytest
import torch

import advfunc
from tests.support.tiny_models import padded_batch, tiny_model

FACTORIES = {
    "fgm": lambda m, **kw: advfunc.fgm(m, epsilon=1.0, **kw),
    "pgd": lambda m, **kw: advfunc.pgd(m, epsilon=0.5, alpha=0.3, steps=3, **kw),
    "freelb": lambda m, **kw: advfunc.freelb(m, steps=2, lr=0.05, **kw),
}


def poisoned_loss_fn(outputs, batch):
    """Cross-entropy whose gradient reaching the embeddings is NaN, while its value is finite.

    The loss adds 0·(NaN-gradient branch): the value is unchanged, the backward is NaN.
    """
    loss = torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])
    poison = outputs.hidden_states[0].abs().sqrt().sum() * 0.0  # d√|x|/dx at x=0 → inf·0 = NaN
    return loss + poison


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_nan_target_gradient_is_skipped(method):
    model = tiny_model("bert")
    batch = dict(padded_batch("bert"), output_hidden_states=True)
    # a zero embedding output guarantees √|x| has an infinite derivative somewhere
    params = advfunc.params_of(model)
    params["bert.embeddings.LayerNorm.weight"] = torch.zeros_like(params["bert.embeddings.LayerNorm.weight"])
    params["bert.embeddings.LayerNorm.bias"] = torch.zeros_like(params["bert.embeddings.LayerNorm.bias"])
    _, out = FACTORIES[method](model, loss_fn=poisoned_loss_fn)(params, batch)
    assert bool(out.skipped)
    delta = out.delta if isinstance(out.delta, torch.Tensor) else torch.cat([d.flatten() for d in out.delta.values()])
    assert torch.equal(delta, torch.zeros_like(delta))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_finite_clean_gradient_never_becomes_nan(method):
    """With a poisoned target gradient only in the attack, the returned grads equal the clean ones twice over."""
    model = tiny_model("bert")
    batch = padded_batch("bert")
    grads, out = FACTORIES[method](model)(advfunc.params_of(model), batch)
    assert not bool(out.skipped)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_huge_loss_scale_gives_a_finite_perturbation(method):
    """Gradients whose squared norm overflows fp32 (scale 1e30) still give a unit direction."""
    model = tiny_model("bert")
    batch = padded_batch("bert")
    params = advfunc.params_of(model)
    _, plain = FACTORIES[method](model)(params, batch)
    _, scaled = FACTORIES[method](model)(params, batch, loss_scale=1e30)
    assert not bool(scaled.skipped)
    torch.testing.assert_close(scaled.delta, plain.delta, rtol=1e-4, atol=1e-6)


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
