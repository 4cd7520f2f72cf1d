"""advfunc.vat against the imperative reference, its cost, its bounds, its purity, a real run."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advfunc
from advfunc.methods.vat import vat
from tests.support.method_harness import PassCounter, lockstep, sharpened, short_run
from tests.support.parity import assert_grads_match
from tests.support.purity import assert_step_is_pure
from tests.support.reference_methods import reference_vat
from tests.support.tiny_models import padded_batch, tiny_model

VIA = {"bert": "inputs_embeds", "gpt2": "hook"}
CONFIG = {"epsilon": 1.0, "xi": 0.1, "alpha": 2.0}


def unlabelled(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("power_iters", [1, 2])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_vat_matches_reference(family, power_iters):
    ref_gen = torch.Generator().manual_seed(5)
    func_gen = torch.Generator().manual_seed(5)
    deltas = []

    def reference(model, batch):
        grads, r_vadv, vat_kl = reference_vat(
            model, batch, power_iters=power_iters, generator=ref_gen, via=VIA[family], **CONFIG
        )
        deltas.append((r_vadv, vat_kl))
        return grads

    step = None

    def functional(model, batch):
        nonlocal step
        step = step or vat(model, power_iters=power_iters, generator=func_gen, **CONFIG)
        return step(advfunc.params_of(model), batch)

    outs = lockstep(family, reference, functional, sharpen=True)
    # r_vadv is compared where it is well conditioned, at the first step: it comes from a
    # finite difference of the KL, of which float32 fixes only a few digits once SGD has
    # flattened it (the grads, the contract, are still compared at every step).
    first, expected = outs[0].delta, deltas[0][0]
    assert ((first - expected).norm() / expected.norm()).item() <= 1e-4
    for out, (_, vat_kl) in zip(outs, deltas, strict=True):
        torch.testing.assert_close(out.adv_loss, vat_kl, rtol=1e-3, atol=1e-7)
        assert not bool(out.skipped)


def test_vat_without_labels_is_the_virtual_adversarial_term_alone():
    model = sharpened(tiny_model("bert"))
    batch = unlabelled(padded_batch("bert"))
    expected, _r_vadv, _ = reference_vat(
        copy.deepcopy(model), batch, power_iters=1, generator=torch.Generator().manual_seed(2), **CONFIG
    )
    step = vat(model, generator=torch.Generator().manual_seed(2), **CONFIG)
    grads, out = step(advfunc.params_of(model), batch)
    assert_grads_match(grads, expected, where="unlabelled")
    assert torch.isnan(out.loss) and out.adv_loss > 0


def test_generator_can_be_overridden_per_call():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    step = vat(model, generator=torch.Generator().manual_seed(0), **CONFIG)
    params = advfunc.params_of(model)
    _, a = step(params, batch, generator=torch.Generator().manual_seed(9))
    _, b = step(params, batch, generator=torch.Generator().manual_seed(9))
    _, c = step(params, batch)
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)


@pytest.mark.parametrize("power_iters", [1, 3])
def test_vat_without_labels_runs_its_clean_pass_forward_only(power_iters):
    """The labelled cost is the catalogue's (test_step_cost.py); without labels the clean pass has no backward."""
    model = tiny_model("bert")
    step = vat(model, power_iters=power_iters)
    assert step.passes == power_iters + 2
    with PassCounter(model) as count:
        step(advfunc.params_of(model), unlabelled(padded_batch("bert")))
    assert count.forwards == step.passes + step.config["forward_only_passes"]
    assert count.backwards == step.passes - 1


@settings(max_examples=15, deadline=None)
@given(
    epsilon=st.floats(1e-3, 10.0),
    xi=st.floats(1e-3, 1.0),
    power_iters=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_vat_perturbation_has_norm_epsilon_and_kl_is_non_negative(tiny_bert, epsilon, xi, power_iters, seed):
    model = tiny_bert
    batch = padded_batch("bert", seed=seed % 50)
    step = vat(model, epsilon=epsilon, xi=xi, power_iters=power_iters, generator=torch.Generator().manual_seed(seed))
    _, out = step(advfunc.params_of(model), batch)
    norms = out.delta.flatten(1).norm(dim=1)
    assert not bool(out.skipped)
    assert torch.all(norms <= epsilon * (1 + 1e-5))
    # Every example moves by ε: the KL's gradient is exact where its value rounds to 0.
    moved = norms > 0
    assert moved.all()
    torch.testing.assert_close(norms[moved], torch.full_like(norms[moved], epsilon), rtol=1e-5, atol=0)
    padding = batch["attention_mask"] == 0
    assert torch.all(out.delta[padding] == 0)
    assert out.adv_loss >= 0


def test_vat_kl_is_exactly_zero_at_zero_perturbation():
    # A zero classifier makes the logits independent of the embeddings: the KL gradient,
    # hence r_vadv, is exactly 0, and so must be the KL at it.
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    params["classifier.weight"] = torch.zeros_like(params["classifier.weight"])
    _, out = vat(model, **CONFIG)(params, padded_batch("bert"))
    assert torch.all(out.delta == 0)
    assert out.adv_loss.item() == 0.0


@pytest.mark.parametrize("labelled", [True, False])
def test_vat_is_pure(labelled):
    model = tiny_model("bert")
    batch = padded_batch("bert")
    batch = batch if labelled else unlabelled(batch)
    params = advfunc.params_of(model)
    step = vat(model, generator=torch.Generator().manual_seed(0))
    grads, _ = assert_step_is_pure(model, lambda: step(params, batch), params, batch)
    assert set(grads) == set(advfunc.trainable_names(model))


def test_vat_grads_are_for_trainable_parameters_only():
    model = tiny_model("bert")
    model.get_input_embeddings().weight.requires_grad_(False)
    grads, _ = vat(model)(advfunc.params_of(model), padded_batch("bert"))
    assert set(grads) == set(advfunc.trainable_names(model))
    assert "bert.embeddings.word_embeddings.weight" not in grads


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"xi": -1.0}, "xi"),
        ({"alpha": float("nan")}, "alpha"),
        ({"power_iters": 0}, "power_iters"),
    ],
)
def test_vat_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        vat(tiny_model("bert"), **kwargs)


def test_vat_rejects_a_non_generator():
    with pytest.raises(TypeError, match="generator"):
        vat(tiny_model("bert"), generator=0)


def test_vat_short_run_decreases_the_loss():
    def make(model):
        step = vat(model, epsilon=1.0, generator=torch.Generator().manual_seed(0))
        return lambda params, batch: step(params, batch)[0]

    before, after = short_run(make)
    assert after < before


@pytest.mark.parametrize("xi", [1e-6, 1e-3, 0.1])
def test_vat_moves_every_example_by_epsilon_on_a_near_uniform_head(xi):
    # A classifier scaled towards zero gives near-uniform probabilities, where the KL's
    # per-class terms round below zero: the power iteration must still find a direction
    # for every example (a KL whose gradient dies with its rounded value gives δ = 0).
    model = tiny_model("bert")
    with torch.no_grad():
        model.classifier.weight.mul_(1e-3)
        model.classifier.bias.zero_()
    batch = padded_batch("bert", batch=8, seed=3)
    attack = advfunc.attacks.vat(model, epsilon=0.5, xi=xi, generator=torch.Generator().manual_seed(0))
    delta = attack(advfunc.params_of(model), unlabelled(batch))
    norms = delta.flatten(1).norm(dim=1)  # [B]
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5), rtol=1e-5, atol=0)
