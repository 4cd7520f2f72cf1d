"""FreeLB training: K ascent steps on the embedding output, the parameter gradients of all K averaged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.model import LossFn
from advfunc.core.noise import require_generator
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired, drop_if_skipped, prepare, report


def freelb(
    model: nn.Module,
    steps: int = 3,
    lr: float = 0.05,
    init_mag: float = 0.0,
    max_norm: float = 0.0,
    norm: str = "l2",
    generator: torch.Generator | None = None,
    per_token: bool = False,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """FreeLB (official algorithm) on the embedding output, per example.

    .. math::
        \\text{grads} = \\frac1K \\sum_{t=1}^{K} ∇_θ L(θ, δ_{t-1}),\\quad
        G_t = ∇_δ \\tfrac1K L(θ, δ_{t-1}),\\quad
        δ_t = Π_{max\\_norm}\\big(δ_{t-1} + lr · G_t / \\max(‖G_t‖, 10^{-8})\\big)

    δ_1..δ_K are the iterates of :func:`advfunc.attacks.freelb`: each of the K passes
    gives both ∇_θ (averaged into the grads) and ∇_δ (the next ascent), so the attack
    costs no pass of its own. ‖·‖ is the per-example L2 (``norm="l2"``) or L∞
    (``"linf"``) norm over (seq, hidden), or with ``per_token`` each token's L2 norm
    over hidden (padding masked); Π rescales (l2) or clamps (linf) to
    ``max_norm`` when ``max_norm > 0``; δ₀ is drawn by
    :func:`advfunc.attacks.freelb.freelb_init` from ``generator``. Cost: K
    forward+backward passes. ``out.loss`` is the mean of the K losses, ``out.delta`` δ_K.
    A step may override the generator: ``step(params, batch, generator=g)``. Paper: Zhu
    et al., "FreeLB: Enhanced Adversarial Training for Natural Language Understanding",
    ICLR 2020.
    """
    attack = attacks.freelb(
        model,
        steps,
        lr,
        init_mag,
        max_norm,
        norm,
        generator,
        per_token,
        loss_fn=loss_fn,
        autocast=autocast,
        compile=compile,
    )
    engine, target, rule = attack.engine, attack.target, attack.rule

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, attack.perturbed, target, params, batch, loss_scale)
        scale = call.scale / steps
        draw_from = attack.generator if generator is None else require_generator(generator)
        delta = rule.init(call, draw_from)
        skipped = torch.zeros((), dtype=torch.bool, device=call.device)
        total: Grads = {}
        losses = []
        with attack.perturbed.hooked(count=not attack.compiled) as calls:
            for t in range(steps):
                last = t == steps - 1  # the embedding gradient stays [B, L, H] until then
                at = engine.full(
                    call, delta, with_delta_grad=True, scale=scale, accumulate_into=total or None, final=last
                )
                check_hook_fired(calls, target)
                total = at.param_grads
                losses.append(at.loss)
                delta, finite = rule.ascend(delta, at.delta_grads, call.params, call.layout)
                skipped = skipped | ~finite
        final = drop_if_skipped(delta, skipped)
        mean_loss = torch.stack(losses).mean()
        return total, report(target, call.layout, final, mean_loss, losses[-1], skipped, at.logits)

    return Step("freelb", steps, {**attack.config, "forward_only_passes": 0}, step)
