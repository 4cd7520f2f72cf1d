"""advfunc.r3f against the imperative reference, its cost, bounds, purity and a real run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advfunc
from advfunc.methods.r3f import r3f
from tests.support.method_harness import lockstep, short_run
from tests.support.purity import assert_step_is_pure
from tests.support.reference_methods import reference_r3f
from tests.support.tiny_models import padded_batch, tiny_model

VIA = {"bert": "inputs_embeds", "gpt2": "hook"}


def zero_task_loss(outputs, batch):
    return outputs.logits.sum() * 0.0


@pytest.mark.parametrize(
    "family,noise,task",
    [
        ("bert", "uniform", True),
        ("bert", "normal", False),  # the consistency term's gradient alone
        ("gpt2", "normal", True),
        ("gpt2", "uniform", False),
    ],
)
def test_r3f_matches_reference(family, noise, task):
    config = {"sigma": 0.3, "lambda_": 4.0, "noise": noise}
    ref_gen = torch.Generator().manual_seed(4)
    func_gen = torch.Generator().manual_seed(4)
    seen = []

    def reference(model, batch):
        grads, z, value = reference_r3f(model, batch, generator=ref_gen, task=task, via=VIA[family], **config)
        seen.append((z, value))
        return grads

    step = None

    def functional(model, batch):
        nonlocal step
        step = step or r3f(model, generator=func_gen, loss_fn=None if task else zero_task_loss, **config)
        return step(advfunc.params_of(model), batch)

    outs = lockstep(family, reference, functional, sharpen=True)
    for out, (z, value) in zip(outs, seen, strict=True):
        assert torch.equal(out.delta, z)  # the same draws from the same generator
        torch.testing.assert_close(out.adv_loss, value, rtol=1e-3, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(sigma=st.floats(1e-6, 2.0), seed=st.integers(0, 2**31 - 1))
def test_r3f_uniform_noise_stays_within_sigma(tiny_bert, sigma, seed):
    model = tiny_bert
    batch = padded_batch("bert", seed=seed % 50)
    step = r3f(model, sigma=sigma, noise="uniform", generator=torch.Generator().manual_seed(seed))
    _, out = step(advfunc.params_of(model), batch)
    assert out.delta.abs().max() <= sigma
    assert torch.all(out.delta[batch["attention_mask"] == 0] == 0)
    assert out.adv_loss >= 0


def test_r3f_is_pure():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    step = r3f(model, generator=torch.Generator().manual_seed(0))
    grads, _ = assert_step_is_pure(model, lambda: step(params, batch), params, batch)
    assert set(grads) == set(advfunc.trainable_names(model))


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        ({"sigma": 0.0}, ValueError, "sigma"),
        ({"lambda_": -1.0}, ValueError, "lambda_"),
        ({"noise": "laplace"}, ValueError, "noise"),
        ({"generator": "seed"}, TypeError, "generator"),
    ],
)
def test_r3f_rejects_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        r3f(tiny_model("bert"), **kwargs)


def test_r3f_short_run_decreases_the_loss():
    def make(model):
        step = r3f(model, sigma=1e-3, generator=torch.Generator().manual_seed(0))
        return lambda params, batch: step(params, batch)[0]

    before, after = short_run(make)
    assert after < before
