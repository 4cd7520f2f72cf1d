"""The attack API: ``delta = attack(params, batch, grads=None)``, and every step a composition of it.

The oracle is independent of the engine: ``advfunc.perturbed_loss`` differentiated with
``torch.func.grad`` (the engine differentiates with ``torch.autograd.grad`` on leaves of
its own), on padded batches of three model families.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.func import grad

import advfunc
from advfunc import attacks
from advfunc.attacks.freelb import freelb_init
from advfunc.core.divergence import kl_logits
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_models import padded_batch, tiny_model

FAMILIES = ["bert", "roberta", "gpt2"]
RELATIVE = 1e-5


def _relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert set(actual) == set(expected)
    a = torch.cat([actual[n].double().flatten() for n in expected])
    e = torch.cat([expected[n].double().flatten() for n in expected])
    return ((a - e).norm() / e.norm()).item()


def _theta_grad(model, loss_at: Callable, params, batch, delta) -> dict[str, torch.Tensor]:
    """∇_θ L(θ, δ) over the trainable parameters, by torch.func.grad of the pure loss."""
    trainable = {n: params[n] for n in advfunc.trainable_names(model)}
    return grad(lambda p: loss_at(p, batch, delta))(trainable)


def _delta_grad(loss_at: Callable, params, batch, delta):
    """∇_δ L(θ, δ), by torch.func.grad of the pure loss."""
    return grad(lambda d: loss_at(params, batch, d))(delta)


def _zeros_like(delta):
    return {k: torch.zeros_like(v) for k, v in delta.items()} if isinstance(delta, dict) else torch.zeros_like(delta)


def _add(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {n: a[n] + scale * b[n] for n in a}


# (step factory, attack factory, perturbed_loss target) for the methods whose grads are
# ∇θ L(θ, 0) + ∇θ L(θ, attack(params, batch)).
def _two_pass_cases(model):
    names = [[n for n, p in model.named_parameters() if p.dim() == 2][-1]]  # the head's weight
    return {
        "fgm-weight": (advfunc.fgm(model, 0.5), attacks.fgm(model, 0.5), "weight"),
        "fgm-embeds": (
            advfunc.fgm(model, 0.5, target="embeds"),
            attacks.fgm(model, 0.5, target="embeds"),
            "embeds",
        ),
        "pgd-weight": (advfunc.pgd(model, 0.5, 0.2, 3), attacks.pgd(model, 0.5, 0.2, 3), "weight"),
        "pgd-embeds": (
            advfunc.pgd(model, 0.5, 0.2, 3, target="embeds"),
            attacks.pgd(model, 0.5, 0.2, 3, target="embeds"),
            "embeds",
        ),
        "pgd-names": (
            advfunc.pgd(model, 0.5, 0.2, 2, target=names),
            attacks.pgd(model, 0.5, 0.2, 2, target=names),
            names,
        ),
        "awp": (advfunc.awp(model, adv_steps=2), attacks.awp(model, adv_steps=2), "awp"),
    }


TWO_PASS = ["fgm-weight", "fgm-embeds", "pgd-weight", "pgd-embeds", "pgd-names", "awp"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", TWO_PASS)
def test_step_is_clean_plus_adversarial_composition_and_grads_change_nothing(family, case):
    model = tiny_model(family)
    params, batch = advfunc.params_of(model), padded_batch(family)
    step, attack, target = _two_pass_cases(model)[case]
    loss_at = advfunc.perturbed_loss(model, target=list(attack.config["names"]) if target == "awp" else target)

    delta = assert_step_is_pure(model, lambda: attack(params, batch), params, batch)
    zero = _zeros_like(delta)
    clean_delta_grad = _delta_grad(loss_at, params, batch, zero)
    with_grads = attack(params, batch, clean_delta_grad)
    for key in delta if isinstance(delta, dict) else [None]:
        got = with_grads if key is None else with_grads[key]
        want = delta if key is None else delta[key]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert float(want.abs().sum()) > 0, "the attack should move"

    grads, out = step(params, batch)
    expected = _add(_theta_grad(model, loss_at, params, batch, zero), _theta_grad(model, loss_at, params, batch, delta))
    assert _relative_error(grads, expected) <= RELATIVE
    assert not bool(out.skipped)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init_mag", [0.0, 0.3])
def test_freelb_step_averages_the_loss_gradient_over_the_attack_iterates(family, init_mag):
    model = tiny_model(family)
    params, batch = advfunc.params_of(model), padded_batch(family)
    steps = 3
    step = advfunc.freelb(model, steps=steps, lr=0.1, init_mag=init_mag)
    grads, out = step(params, batch, generator=torch.Generator().manual_seed(4))
    loss_at = advfunc.perturbed_loss(model, target="embeds")

    mask = batch["attention_mask"].unsqueeze(-1).float()
    layout = type("L", (), {"mask": mask, "shape": (*batch["input_ids"].shape, 32)})()
    iterates = [
        freelb_init(layout, init_mag, "l2", torch.float32, torch.device("cpu"), torch.Generator().manual_seed(4))
    ]
    for t in range(1, steps + 1):
        attack = attacks.freelb(model, steps=t, lr=0.1, init_mag=init_mag)
        iterates.append(attack(params, batch, generator=torch.Generator().manual_seed(4)))
    expected: dict[str, torch.Tensor] = {}
    for delta in iterates[:steps]:
        g = _theta_grad(model, loss_at, params, batch, delta)
        expected = g if not expected else _add(expected, g)
    expected = {n: v / steps for n, v in expected.items()}
    assert _relative_error(grads, expected) <= RELATIVE
    torch.testing.assert_close(out.delta, iterates[-1], rtol=1e-5, atol=1e-7)
    if init_mag == 0:
        zero = torch.zeros_like(iterates[-1])
        again = attacks.freelb(model, steps=steps, lr=0.1)(params, batch, _delta_grad(loss_at, params, batch, zero))
        torch.testing.assert_close(again, iterates[-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_vat_step_is_loss_plus_alpha_kl_at_the_attack(family):
    from tests.support.method_harness import SHARPEN, sharpened

    model = sharpened(tiny_model(family), SHARPEN.get(family, 10.0))
    params, batch = advfunc.params_of(model), padded_batch(family)
    alpha = 0.7
    grads, out = advfunc.vat(model, epsilon=0.5, xi=0.1, alpha=alpha)(
        params, batch, generator=torch.Generator().manual_seed(9)
    )
    attack = attacks.vat(model, epsilon=0.5, xi=0.1)
    r = attack(params, batch, generator=torch.Generator().manual_seed(9))
    ce_at = advfunc.perturbed_loss(model, target="embeds")
    given = attack(
        params,
        batch,
        _delta_grad(ce_at, params, batch, torch.zeros_like(r)),
        generator=torch.Generator().manual_seed(9),
    )
    torch.testing.assert_close(given, r, rtol=0, atol=0)

    with torch.no_grad():
        clean = model(**batch).logits
    kl_at = advfunc.perturbed_loss(model, target="embeds", loss_fn=lambda outputs, b: kl_logits(clean, outputs.logits))
    expected = _add(
        _theta_grad(model, ce_at, params, batch, torch.zeros_like(r)),
        _theta_grad(model, kl_at, params, batch, r),
        alpha,
    )
    assert _relative_error(grads, expected) <= RELATIVE
    torch.testing.assert_close(out.delta, r, rtol=1e-5, atol=1e-7)


def test_perturbed_loss_is_differentiable_in_params_and_delta_and_refuses_a_wrong_delta():
    model = tiny_model("bert")
    params, batch = advfunc.params_of(model), padded_batch("bert")
    loss_at = advfunc.perturbed_loss(model, target="embeds")
    delta = torch.zeros(4, 12, 32)
    with torch.no_grad():
        plain = model(**batch).loss
    torch.testing.assert_close(loss_at(params, batch, delta), plain)
    g_params, g_delta = grad(loss_at, argnums=(0, 2))(params, batch, delta)
    assert g_delta.shape == delta.shape and float(g_delta.abs().sum()) > 0
    assert bool((g_delta[~batch["attention_mask"].bool()] == 0).all()), "padding has no gradient"
    assert set(g_params) == set(params)
    with pytest.raises(ValueError, match=r"delta has shape \(4, 11, 32\)"):
        loss_at(params, batch, torch.zeros(4, 11, 32))
    with pytest.raises(ValueError, match="grads has shape"):
        attacks.pgd(model, target="embeds")(params, batch, torch.zeros(2, 12, 32))
