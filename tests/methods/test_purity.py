"""A step changes nothing it is given: params, batch, model weights, .grad, mode, hooks."""

from __future__ import annotations

import pytest
import torch

import advfunc
from tests.support.catalogue import CATALOGUE
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_models import padded_batch, tiny_model

# Every catalogued method, and the targets and options that take other code paths.
VARIANTS = {
    **{name: (name, {}) for name in CATALOGUE},
    "fgm-embeds": ("fgm", {"target": "embeds"}),
    "pgd-embeds": ("pgd", {"target": "embeds"}),
    "pgd-names": ("pgd", {"epsilon": 0.1, "alpha": 0.05, "target": ["classifier.weight", "bert.pooler.dense.weight"]}),
    "freelb-max-norm": ("freelb", {"init_mag": 1.0, "max_norm": 0.5}),
    "lat-retain-kl": ("lat", {"retain_kl": True}),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", sorted(VARIANTS))
def test_step_is_pure(method, mode):
    name, overrides = VARIANTS[method]
    entry = CATALOGUE[name]
    model = entry.make_model()
    if mode == "eval":
        model.eval()
    # An existing .grad must survive untouched (a user's accumulated gradient).
    next(model.parameters()).grad = torch.full_like(next(model.parameters()), 0.25)
    params = advfunc.params_of(model)
    batch = entry.make_batch()
    step = entry.build(model, **overrides)
    grads, out = assert_step_is_pure(model, lambda: entry.call(step, params, batch), params, batch)
    assert set(grads) == set(advfunc.trainable_names(model))
    assert all(not g.requires_grad for g in grads.values())
    assert out.loss.requires_grad is False and out.adv_loss.requires_grad is False


def test_params_of_shares_storage_without_grad():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    for name, p in model.named_parameters():
        assert params[name].data_ptr() == p.data_ptr()
        assert not params[name].requires_grad


def test_grads_follow_the_models_trainable_set():
    """Frozen parameters (a frozen embedding, as under LoRA) get no key in grads."""
    model = tiny_model("bert")
    model.get_input_embeddings().weight.requires_grad_(False)
    grads, out = advfunc.pgd(model, epsilon=0.5, alpha=0.3, steps=2, target="embeds")(
        advfunc.params_of(model), padded_batch("bert")
    )
    assert "bert.embeddings.word_embeddings.weight" not in grads
    assert set(grads) == set(advfunc.trainable_names(model))
    assert out.delta.shape == (4, 12, 32)


def test_grads_keep_shape_and_dtype():
    model = tiny_model("roberta")
    grads, _ = advfunc.fgm(model)(advfunc.params_of(model), padded_batch("roberta"))
    for name, p in model.named_parameters():
        assert grads[name].shape == p.shape and grads[name].dtype == p.dtype


def test_set_grads_writes_and_accumulates():
    model = tiny_model("bert")
    grads, _ = advfunc.fgm(model)(advfunc.params_of(model), padded_batch("bert"))
    advfunc.set_grads(model, grads)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name])
    advfunc.set_grads(model, grads, accumulate=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * grads[name])


def test_set_grads_rejects_unknown_names_and_shapes_without_writing():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="not parameters of the model"):
        advfunc.set_grads(model, {"nope.weight": torch.zeros(1)})
    name = "classifier.weight"
    with pytest.raises(ValueError, match="shape"):
        advfunc.set_grads(model, {"classifier.bias": torch.zeros(3), name: torch.zeros(2, 2)})
    assert all(p.grad is None for p in model.parameters())
