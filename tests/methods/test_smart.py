"""advfunc.smart against the imperative reference, its cost, bounds, purity and a real run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advfunc
from advfunc.methods.smart import smart
from advfunc.methods.teacher import ema, teacher_of
from tests.support.method_harness import SHARPEN, lockstep, sharpened, short_run
from tests.support.purity import assert_step_is_pure
from tests.support.reference_methods import reference_ema_, reference_smart
from tests.support.tiny_models import padded_batch, tiny_model

VIA = {"bert": "inputs_embeds", "gpt2": "hook"}
BETA = 0.9


def zero_task_loss(outputs, batch):
    return outputs.logits.sum() * 0.0


@pytest.mark.parametrize(
    "family,norm,steps,mu,task",
    [
        ("bert", "linf", 1, 2.0, True),
        ("bert", "l2", 2, 2.0, True),
        ("bert", "linf", 2, 0.0, False),  # the regulariser's gradient alone
        ("gpt2", "l2", 1, 2.0, True),
        ("gpt2", "linf", 2, 2.0, False),
    ],
)
def test_smart_matches_reference(family, norm, steps, mu, task):
    config = {"epsilon": 0.1, "step_size": 0.05, "steps": steps, "noise_var": 0.05, "lambda_s": 2.0, "mu": mu}
    ref_gen = torch.Generator().manual_seed(3)
    func_gen = torch.Generator().manual_seed(3)
    ref_teacher = sharpened(tiny_model(family, seed=1), SHARPEN[family])
    func_teacher = teacher_of(advfunc.params_of(sharpened(tiny_model(family, seed=1), SHARPEN[family])))
    smoothness = []

    def reference(model, batch):
        if smoothness:  # θ̃ follows θ after each optimizer step
            reference_ema_(ref_teacher, model, BETA)
        grads, delta, value = reference_smart(
            model, ref_teacher, batch, norm=norm, generator=ref_gen, task=task, via=VIA[family], **config
        )
        smoothness.append((delta, value))
        return grads

    step = None

    def functional(model, batch):
        nonlocal step, func_teacher
        if step is None:
            loss_fn = None if task else zero_task_loss
            step = smart(model, norm=norm, generator=func_gen, loss_fn=loss_fn, **config)
        else:
            func_teacher = ema(func_teacher, advfunc.params_of(model), BETA)
        return step(advfunc.params_of(model), batch, func_teacher if mu > 0 else None)

    outs = lockstep(family, reference, functional, sharpen=True)
    # The perturbation is compared where it is well conditioned, at the first step: once
    # SGD has flattened the KL, float32 fixes only a few digits of a per-token direction
    # (the grads, the contract, are still compared at every step).
    torch.testing.assert_close(outs[0].delta, smoothness[0][0], rtol=1e-4, atol=1e-6)
    for out, (_, value) in zip(outs, smoothness, strict=True):
        torch.testing.assert_close(out.adv_loss, value, rtol=1e-3, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(
    epsilon=st.floats(1e-4, 1.0),
    step_size=st.floats(1e-4, 2.0),
    steps=st.integers(1, 3),
    noise_var=st.floats(0.0, 1.0),
    norm=st.sampled_from(["linf", "l2"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_smart_perturbation_stays_in_its_per_token_ball(tiny_bert, epsilon, step_size, steps, noise_var, norm, seed):
    model = tiny_bert
    params = advfunc.params_of(model)
    batch = padded_batch("bert", seed=seed % 50)
    step = smart(
        model,
        epsilon=epsilon,
        step_size=step_size,
        steps=steps,
        noise_var=noise_var,
        norm=norm,
        generator=torch.Generator().manual_seed(seed),
    )
    _, out = step(params, batch, params)
    if norm == "linf":
        assert out.delta.abs().max() <= epsilon
    else:
        assert out.delta.norm(dim=-1).max() <= epsilon * (1 + 1e-6)
    assert torch.all(out.delta[batch["attention_mask"] == 0] == 0)
    assert out.adv_loss >= 0


def test_smart_kl_terms_are_exactly_zero_at_zero_perturbation():
    # With no random start the symmetric KL is flat at δ = 0 (its gradient is exactly 0),
    # so δ stays 0 and the smoothness term must be exactly 0; a teacher equal to θ makes
    # the proximal term exactly 0, hence grads equal the plain task gradient.
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    grads, out = smart(model, noise_var=0.0, epsilon=0.1, step_size=0.1, steps=2, mu=5.0)(params, batch, params)
    assert torch.all(out.delta == 0)
    assert out.adv_loss.item() == 0.0
    leaves = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    task = torch.func.functional_call(model, leaves, (), batch).loss
    expected = dict(zip(leaves, torch.autograd.grad(task, list(leaves.values())), strict=True))
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7)


def test_smart_is_pure_and_leaves_the_teacher_alone():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    teacher = teacher_of(advfunc.params_of(tiny_model("bert", seed=1)))
    snapshot = {n: t.clone() for n, t in teacher.items()}
    batch = padded_batch("bert")
    step = smart(model, generator=torch.Generator().manual_seed(0))
    grads, _ = assert_step_is_pure(model, lambda: step(params, batch, teacher), params, batch)
    assert set(grads) == set(advfunc.trainable_names(model))
    assert all(torch.equal(teacher[n], snapshot[n]) for n in teacher)


def test_smart_teacher_may_hold_only_the_trainable_parameters():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    step = smart(model, generator=torch.Generator().manual_seed(0))
    full, _ = step(params, batch, params)
    step = smart(model, generator=torch.Generator().manual_seed(0))
    some = {n: params[n] for n in advfunc.trainable_names(model)[:5]}
    partial, _ = step(params, batch, some)
    assert all(torch.equal(full[n], partial[n]) for n in full)


@pytest.mark.parametrize(
    "teacher,error,match",
    [
        (None, ValueError, "mu"),
        ({"nope": torch.zeros(1)}, ValueError, "nope"),
        ({"classifier.bias": torch.zeros(7)}, ValueError, "classifier.bias"),
        ([1, 2], TypeError, "teacher"),
    ],
)
def test_smart_rejects_a_bad_teacher(teacher, error, match):
    model = tiny_model("bert")
    with pytest.raises(error, match=match):
        smart(model)(advfunc.params_of(model), padded_batch("bert"), teacher)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"step_size": -1.0}, "step_size"),
        ({"steps": 0}, "steps"),
        ({"noise_var": -1e-5}, "noise_var"),
        ({"lambda_s": 0.0}, "lambda_s"),
        ({"mu": -1.0}, "mu"),
        ({"norm": "l1"}, "norm"),
    ],
)
def test_smart_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        smart(tiny_model("bert"), **kwargs)


def test_smart_short_run_decreases_the_loss():
    def make(model):
        step = smart(model, epsilon=1e-3, step_size=1e-3, generator=torch.Generator().manual_seed(0))
        teacher = teacher_of(advfunc.params_of(model))

        def train(params, batch):
            nonlocal teacher
            grads, _ = step(params, batch, teacher)
            teacher = ema(teacher, params, 0.99)
            return grads

        return train

    before, after = short_run(make)
    assert after < before
