"""FGM: the fast gradient method on the embedding (Miyato et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.arguments import require_positive
from advfunc.engine import Engine, resolve_compile
from advfunc.forward import LossFn, PerturbedModel
from advfunc.norms import l2_direction
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
from advfunc.targets import TargetSpec, resolve_target


def fgm(
    model: nn.Module,
    epsilon: float = 1.0,
    *,
    target: TargetSpec = "weight",
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """Fast Gradient Method: one L2-normalised ascent step on the target, then train on both.

    .. math::
        G = ∇_δ L(θ, 0),\\quad r = ε · G / ‖G‖₂ \\;(r = 0 \\text{ when } ‖G‖ = 0),\\quad
        \\text{grads} = ∇_θ L(θ, 0) + ∇_θ L(θ, r)

    The norm is the target's: over the whole embedding-matrix gradient (``"weight"``, the
    seed's), per example over (seq, hidden) (``"embeds"``), per parameter (names).
    Cost: 2 forward+backward passes. Paper: Miyato, Dai & Goodfellow, "Adversarial
    Training Methods for Semi-Supervised Text Classification", ICLR 2017.

    Example::

        step = advfunc.fgm(model, epsilon=1.0)
        grads, out = step(advfunc.params_of(model), batch)  # out.delta: [N, H] rows
    """
    epsilon = require_positive("epsilon", epsilon)
    chosen = resolve_target(model, target, allowed=("weight", "embeds", "names"))
    perturbed = PerturbedModel(model, loss_fn, autocast)
    engine = Engine(perturbed, chosen, resolve_compile(compile, model))

    def step(
        params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch)
        scale = as_scale(loss_scale, call.device)
        zero = zero_delta(chosen, call)
        with perturbed.hooked(count=not engine.compiled) as calls:
            clean = engine.full(
                call.params, call.trainable, call.kwargs, call.layout, zero, with_delta_grad=True, scale=scale
            )
            check_hook_fired(calls if chosen.kind != "params" else None)
            skipped = torch.zeros((), dtype=torch.bool, device=call.device)
            r = {}
            for key, g in clean.delta_grads.items():
                direction, finite = l2_direction(g, chosen.norm_dims(g))
                skipped = skipped | ~finite
                r[key] = (epsilon * direction).to(zero[key].dtype)
            r = drop_if_skipped(r, skipped)
            adv = engine.full(
                call.params,
                call.trainable,
                call.kwargs,
                call.layout,
                r,
                with_delta_grad=False,
                scale=scale,
                accumulate_into=clean.param_grads,
            )
        grads = adv.param_grads  # clean + adversarial, summed in the clean pass's buffers
        return grads, report(chosen, call.layout, r, clean.loss, adv.loss, skipped, clean.logits)

    return Step("fgm", 2, {"epsilon": epsilon, "target": chosen.kind}, step)
