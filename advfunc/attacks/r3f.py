"""R3F's perturbation: random noise on the embedding output, no ascent (Aghajanyan et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule
from advfunc.core.arguments import require_positive
from advfunc.core.model import LossFn
from advfunc.core.noise import gaussian, uniform
from advfunc.core.params import Params
from advfunc.core.step import Call
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, input_embedding

NOISES = ("uniform", "normal")


def r3f_rule(target: EmbeddingOutput, sigma: float, noise: str) -> Rule:
    """z ~ U(−σ, σ) or N(0, σ²I), zero at padding; no ascent step."""
    draw = uniform if noise == "uniform" else gaussian

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        return {"embeds": draw(call.layout, sigma, target.dtype, call.device, generator)}  # [B, L, H]

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        raise AssertionError("R3F takes no ascent step")

    return Rule(init, ascend, 0, reads_grads=False)


def r3f(
    model: nn.Module,
    sigma: float = 1e-5,
    noise: str = "uniform",
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
) -> Attack:
    """R3F's noise on the embedding output: ``z = attack(params, batch)`` [B, L, H].

    .. math::
        z \\sim U(−σ, σ) \\text{ (fairseq's default) or } N(0, σ^2 I)

    zero at padding, drawn from ``generator``. There is no ascent, so ``grads`` is
    accepted for the protocol and never read, and nothing is compiled. Cost: no pass.
    Paper: Aghajanyan et al., "Better Fine-Tuning by Reducing Representational Collapse",
    ICLR 2021.
    """
    sigma = require_positive("sigma", sigma)
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    chosen = EmbeddingOutput(input_embedding(model))
    config = {"sigma": sigma, "noise": noise, "target": "embeds"}
    rule = r3f_rule(chosen, sigma, noise)
    return Attack("r3f", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, generator=generator)
