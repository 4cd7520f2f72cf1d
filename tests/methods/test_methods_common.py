"""What every method shares: families, trainable-only grads, loss_scale, compile, non-finite grads."""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.methods.awp import awp
from advfunc.methods.free_at import free_at
from tests.support.catalogue import CATALOGUE, seeded
from tests.support.tiny_models import padded_batch, tiny_model


def _call(method, model, params, batch, **kwargs):
    """(grads, out) of the catalogued ``method`` with its state; the same draws on each call."""
    entry = CATALOGUE[method]
    draws = {"generator": seeded(0)} if entry.seeded else {}
    return entry.call(entry.build(model), params, batch, **draws, **kwargs)


METHODS = sorted(CATALOGUE)
CLASSIFIER_METHODS = [name for name in METHODS if CATALOGUE[name].model == "classifier"]
NOISE = {"neftune", "r3f"}  # their δ is drawn noise, aimed by no gradient


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_method_runs_on_other_families_with_a_frozen_embedding(method, family):
    model = tiny_model(family)
    model.get_input_embeddings().weight.requires_grad_(False)  # as under LoRA
    grads, out = _call(method, model, advfunc.params_of(model), padded_batch(family))
    assert set(grads) == set(advfunc.trainable_names(model))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert not bool(out.skipped) and torch.isfinite(out.adv_loss)


@pytest.mark.parametrize("method", METHODS)
def test_loss_scale_multiplies_the_grads(method):
    model = CATALOGUE[method].make_model()
    params = advfunc.params_of(model)
    batch = CATALOGUE[method].make_batch()
    plain, out = _call(method, model, params, batch)
    scaled, scaled_out = _call(method, model, params, batch, loss_scale=8.0)
    for name in plain:
        torch.testing.assert_close(scaled[name], 8.0 * plain[name], rtol=1e-4, atol=1e-6)
    delta = out.delta if isinstance(out.delta, dict) else {"delta": out.delta}
    scaled_delta = scaled_out.delta if isinstance(scaled_out.delta, dict) else {"delta": scaled_out.delta}
    for key in delta:  # the perturbation does not depend on the loss scale
        torch.testing.assert_close(scaled_delta[key], delta[key], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awp", "free_at"])
def test_compiled_step_equals_eager(method):
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    factory = {"awp": lambda c: awp(model, adv_steps=2, compile=c), "free_at": lambda c: free_at(model, compile=c)}
    eager, eager_out = factory[method](False)(params, batch)
    compiled, compiled_out = factory[method](True)(params, batch)
    a = torch.cat([eager[n].flatten() for n in eager])
    c = torch.cat([compiled[n].flatten() for n in eager])
    assert ((a - c).norm() / a.norm()).item() <= 1e-5
    torch.testing.assert_close(compiled_out.loss, eager_out.loss)


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_a_non_finite_gradient_drops_the_perturbation(method):
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    poisoned = params["classifier.weight"].clone()
    poisoned[0, 0] = float("nan")
    params = {**params, "classifier.weight": poisoned}
    _, out = _call(method, model, params, padded_batch("bert"))
    assert bool(out.skipped)
    if method not in NOISE:
        deltas = out.delta.values() if isinstance(out.delta, dict) else [out.delta]
        assert all(torch.all(d == 0) for d in deltas)
