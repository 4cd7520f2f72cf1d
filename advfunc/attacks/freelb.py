"""FreeLB's perturbation: K normalised ascent steps on the embedding output (Zhu et al., 2020)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule
from advfunc.core.arguments import require_non_negative, require_norm, require_positive, require_steps
from advfunc.core.model import LossFn
from advfunc.core.norms import l2_direction, linf_direction
from advfunc.core.params import Params
from advfunc.core.projection import project_l2, project_linf
from advfunc.core.step import Call
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, input_embedding

# FreeLB's own guard against a zero gradient norm: G / clamp(‖G‖, min=1e-8).
NORM_FLOOR = 1e-8


def freelb_init(
    layout: Layout,
    init_mag: float,
    norm: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    per_token: bool = False,
) -> torch.Tensor:
    """δ₀ [B, L, H], padding masked.

    l2: U(−1, 1) · mask · init_mag / √(len · H) per example (``per_token``: / √H, each token's own
    ball); linf: U(−init_mag, init_mag) · mask; zero when init_mag = 0. Draws come from
    ``generator`` (the global RNG when None).
    """
    assert layout.mask is not None
    if init_mag == 0:
        return torch.zeros(layout.shape, dtype=dtype, device=device)
    if norm == "l2":
        noise = torch.empty(layout.shape, dtype=dtype, device=device).uniform_(-1, 1, generator=generator)
        noise = noise * layout.mask
        if per_token:
            return noise * (init_mag / layout.shape[-1] ** 0.5)
        dims = layout.mask.sum(dim=(1, 2)) * layout.shape[-1]  # [B] len · H
        return noise * (init_mag / torch.sqrt(dims)).view(-1, 1, 1)
    noise = torch.empty(layout.shape, dtype=dtype, device=device).uniform_(-init_mag, init_mag, generator=generator)
    return noise * layout.mask


def freelb_rule(
    target: EmbeddingOutput, steps: int, lr: float, init_mag: float, max_norm: float, norm: str, per_token: bool = False
) -> Rule:
    """δ₀ from :func:`freelb_init`; δ_t = Π_{max_norm}(δ_{t-1} + lr · G_t / max(‖G_t‖, 1e-8)), the norm per example
    over (seq, hidden), or ``per_token`` over hidden with padding masked."""
    direction_of = l2_direction if norm == "l2" else linf_direction
    dims = (2,) if per_token else (1, 2)

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        return {"embeds": freelb_init(call.layout, init_mag, norm, target.dtype, call.device, generator, per_token)}

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        embeds = delta["embeds"]  # [B, L, H]
        direction, finite = direction_of(grads["embeds"], dims, NORM_FLOOR)
        if per_token:  # a padding position's own unit step would otherwise move it
            assert layout.mask is not None
            direction = direction * layout.mask
        moved = (embeds.float() + lr * direction).to(embeds.dtype)
        if max_norm > 0:
            moved = project_l2(moved, max_norm, dims) if norm == "l2" else project_linf(moved, max_norm)
        return {"embeds": moved}, finite

    return Rule(init, ascend, steps, reads_grads=init_mag == 0)


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
) -> Attack:
    """FreeLB's ascent on the embedding output: ``delta = attack(params, batch, grads=None)`` [B, L, H].

    .. math::
        G_t = ∇_δ L(θ, δ_{t-1}),\\quad
        δ_t = Π_{max\\_norm}\\big(δ_{t-1} + lr · G_t / \\max(‖G_t‖, 10^{-8})\\big),\\quad δ = δ_K

    ‖·‖ is the per-example L2 (``norm="l2"``) or L∞ (``"linf"``) norm over (seq, hidden),
    or with ``per_token`` each token's L2 norm over hidden (every token its own step and
    ball, padding masked; the per-token variant of FreeLB++'s search, Li et al., 2021);
    Π rescales (l2) or clamps (linf) to ``max_norm`` when ``max_norm > 0``; δ₀ is drawn by
    :func:`freelb_init` from ``generator`` (zero when ``init_mag = 0``: only then is the
    caller's ``grads``, taken at δ = 0, the first gradient). Cost: K passes that
    differentiate δ only. The FreeLB training step averages the parameter gradients at
    δ₀..δ_{K-1}; this returns δ_K. Paper: Zhu et al., "FreeLB: Enhanced Adversarial
    Training for Natural Language Understanding", ICLR 2020.
    """
    steps = require_steps("steps", steps)
    lr = require_positive("lr", lr)
    init_mag = require_non_negative("init_mag", init_mag)
    max_norm = require_non_negative("max_norm", max_norm)
    norm = require_norm(norm)
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token must be True or False, got {per_token!r}")
    if per_token and norm == "linf":
        raise ValueError("per_token=True with norm='linf': L∞ is per entry, so per token it is the same; leave it out")
    chosen = EmbeddingOutput(input_embedding(model))
    config = {"steps": steps, "lr": lr, "init_mag": init_mag, "max_norm": max_norm, "norm": norm, "target": "embeds"}
    config |= {"per_token": True} if per_token else {}
    rule = freelb_rule(chosen, steps, lr, init_mag, max_norm, norm, per_token)
    return Attack(
        "freelb",
        model,
        chosen,
        rule,
        config,
        loss_fn=loss_fn,
        autocast=autocast,
        compile=compile,
        generator=generator,
    )
