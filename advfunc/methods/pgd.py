"""PGD: projected gradient ascent on the embedding (Madry et al., 2018)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.arguments import require_positive, require_steps
from advfunc.engine import Engine, resolve_compile
from advfunc.forward import LossFn, PerturbedModel
from advfunc.norms import l2_direction
from advfunc.parameters import Params
from advfunc.projection import project_l2
from advfunc.step import (
    Grads,
    Step,
    StepOutput,
    as_scale,
    check_hook_fired,
    drop_if_skipped,
    prepare,
    report,
    zero_delta,
)
from advfunc.targets import Delta, Layout, Target, TargetSpec, resolve_target


def pgd_ascent(delta: Delta, grads: Delta, target: Target, epsilon: float, alpha: float) -> tuple[Delta, torch.Tensor]:
    """One PGD update, δ' = Π_ε(δ + α · G/‖G‖₂), and whether G was finite.

    A zero or non-finite G leaves δ where it is (the seed's ``if norm != 0``).
    """
    moved: Delta = {}
    finite_all = torch.ones((), dtype=torch.bool, device=next(iter(delta.values())).device)
    for key, value in delta.items():
        dims = target.norm_dims(value)
        direction, finite = l2_direction(grads[key], dims)
        finite_all = finite_all & finite
        moved[key] = project_l2((value.float() + alpha * direction).to(value.dtype), epsilon, dims)
    return moved, finite_all


def pgd(
    model: nn.Module,
    epsilon: float = 1.0,
    alpha: float = 0.3,
    steps: int = 3,
    *,
    target: TargetSpec = "weight",
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """Projected Gradient Descent adversarial training, the seed's K-step loop.

    .. math::
        δ_0 = 0,\\quad G_t = ∇_δ L(θ, δ_{t-1}),\\quad
        δ_t = Π_ε(δ_{t-1} + α · G_t / ‖G_t‖₂),\\quad
        \\text{grads} = ∇_θ L(θ, 0) + ∇_θ L(θ, δ_K)

    Π_ε is the L2 ball of radius ε around the unperturbed target, with the target's norm
    (whole matrix for ``"weight"``, per example for ``"embeds"``, per parameter for names).
    G_1 comes free with the clean pass; G_2..G_K are passes that differentiate δ only.
    Cost: 2 full forward+backward passes + (K−1) passes with no parameter gradient; the
    inner loop is compiled with ``torch.compile(fullgraph=True)`` when ``compile`` is on
    (default: on CUDA). Paper: Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018.

    Example::

        pgd_step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=3)
        grads, out = pgd_step(params, batch)
        advfunc.set_grads(model, grads); optimizer.step()
    """
    epsilon = require_positive("epsilon", epsilon)
    alpha = require_positive("alpha", alpha)
    steps = require_steps("steps", steps)
    chosen = resolve_target(model, target, allowed=("weight", "embeds", "names"))
    perturbed = PerturbedModel(model, loss_fn, autocast)
    engine = Engine(perturbed, chosen, resolve_compile(compile, model))

    def inner_step(
        params: Params, kwargs: Mapping[str, Any], layout: Layout, delta: Delta, scale: torch.Tensor
    ) -> tuple[Delta, torch.Tensor]:
        return pgd_ascent(delta, engine.delta_only(params, kwargs, layout, delta, scale), chosen, epsilon, alpha)

    inner = torch.compile(inner_step, fullgraph=True) if engine.compiled else inner_step

    def step(
        params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch)
        scale = as_scale(loss_scale, call.device)
        with perturbed.hooked(count=not engine.compiled) as calls:
            clean = engine.full(
                call.params,
                call.trainable,
                call.kwargs,
                call.layout,
                zero_delta(chosen, call),
                with_delta_grad=True,
                scale=scale,
            )
            check_hook_fired(calls if chosen.kind != "params" else None)
            delta, finite = pgd_ascent(zero_delta(chosen, call), clean.delta_grads, chosen, epsilon, alpha)
            skipped = ~finite
            for _ in range(steps - 1):
                delta, finite = inner(call.params, call.kwargs, call.layout, delta, scale)
                skipped = skipped | ~finite
            delta = drop_if_skipped(delta, skipped)
            adv = engine.full(
                call.params,
                call.trainable,
                call.kwargs,
                call.layout,
                delta,
                with_delta_grad=False,
                scale=scale,
                accumulate_into=clean.param_grads,
            )
        grads = adv.param_grads  # clean + adversarial, summed in the clean pass's buffers
        return grads, report(chosen, call.layout, delta, clean.loss, adv.loss, skipped, clean.logits)

    return Step("pgd", steps + 1, {"epsilon": epsilon, "alpha": alpha, "steps": steps, "target": chosen.kind}, step)
