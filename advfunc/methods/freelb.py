"""FreeLB: K ascent steps on the embedding output, the parameter gradients of all K averaged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.arguments import require_non_negative, require_norm, require_positive, require_steps
from advfunc.engine import Engine, resolve_compile
from advfunc.forward import LossFn, PerturbedModel
from advfunc.norms import l2_direction, linf_direction
from advfunc.projection import project_l2, project_linf
from advfunc.step import Grads, Step, StepOutput, as_scale, check_hook_fired, drop_if_skipped, prepare, report
from advfunc.targets import EmbeddingOutput, Layout, resolve_target

# FreeLB's own guard against a zero gradient norm: G / clamp(‖G‖, min=1e-8).
NORM_FLOOR = 1e-8


def freelb_init(
    layout: Layout,
    init_mag: float,
    norm: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """δ₀ [B, L, H], padding masked.

    l2: U(−1, 1) · mask · init_mag / √(len · H) per example; linf: U(−init_mag, init_mag) · mask;
    zero when init_mag = 0. Draws come from ``generator`` (the global RNG when None).
    """
    assert layout.mask is not None
    if init_mag == 0:
        return torch.zeros(layout.shape, dtype=dtype, device=device)
    if norm == "l2":
        noise = torch.empty(layout.shape, dtype=dtype, device=device).uniform_(-1, 1, generator=generator)
        noise = noise * layout.mask
        dims = layout.mask.sum(dim=(1, 2)) * layout.shape[-1]  # [B] len · H
        return noise * (init_mag / torch.sqrt(dims)).view(-1, 1, 1)
    noise = torch.empty(layout.shape, dtype=dtype, device=device).uniform_(-init_mag, init_mag, generator=generator)
    return noise * layout.mask


def freelb(
    model: nn.Module,
    steps: int = 3,
    lr: float = 0.05,
    init_mag: float = 0.0,
    max_norm: float = 0.0,
    norm: str = "l2",
    generator: torch.Generator | None = None,
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

    ‖·‖ is the per-example L2 (``norm="l2"``) or L∞ (``"linf"``) norm over (seq, hidden);
    Π rescales (l2) or clamps (linf) to ``max_norm`` when ``max_norm > 0``; δ₀ is drawn by
    :func:`freelb_init` from ``generator``. Cost: K forward+backward passes; each gives
    both ∇_θ and ∇_δ. ``out.loss`` is the mean of the K losses. A step may override the
    generator: ``step(params, batch, generator=g)``. Paper: Zhu et al., "FreeLB: Enhanced
    Adversarial Training for Natural Language Understanding", ICLR 2020.
    """
    steps = require_steps("steps", steps)
    lr = require_positive("lr", lr)
    init_mag = require_non_negative("init_mag", init_mag)
    max_norm = require_non_negative("max_norm", max_norm)
    norm = require_norm(norm)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    chosen = resolve_target(model, "embeds", allowed=("embeds",))
    assert isinstance(chosen, EmbeddingOutput)
    perturbed = PerturbedModel(model, loss_fn, autocast)
    engine = Engine(perturbed, chosen, resolve_compile(compile, model))
    direction_of = l2_direction if norm == "l2" else linf_direction
    default_generator = generator

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch)
        scale = as_scale(loss_scale, call.device) / steps
        embeds = freelb_init(
            call.layout,
            init_mag,
            norm,
            chosen.dtype,
            call.device,
            generator if generator is not None else default_generator,
        )
        skipped = torch.zeros((), dtype=torch.bool, device=call.device)
        total: Grads = {}
        losses = []
        with perturbed.hooked(count=not engine.compiled) as calls:
            for _ in range(steps):
                at = engine.full(
                    call.params,
                    call.trainable,
                    call.kwargs,
                    call.layout,
                    {"embeds": embeds},
                    with_delta_grad=True,
                    scale=scale,
                    accumulate_into=total or None,
                )
                check_hook_fired(calls)
                total = at.param_grads
                losses.append(at.loss)
                direction, finite = direction_of(at.delta_grads["embeds"], (1, 2), NORM_FLOOR)
                skipped = skipped | ~finite
                moved = (embeds.float() + lr * direction).to(embeds.dtype)
                if max_norm > 0:
                    moved = project_l2(moved, max_norm, (1, 2)) if norm == "l2" else project_linf(moved, max_norm)
                embeds = moved
        final = drop_if_skipped({"embeds": embeds}, skipped)
        mean_loss = torch.stack(losses).mean()
        return total, report(chosen, call.layout, final, mean_loss, losses[-1], skipped, at.logits)

    config = {"steps": steps, "lr": lr, "init_mag": init_mag, "max_norm": max_norm, "norm": norm, "target": "embeds"}
    return Step("freelb", steps, config, step)
