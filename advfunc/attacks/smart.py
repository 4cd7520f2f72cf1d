"""SMART's perturbation: ascent on the symmetric KL from the clean prediction (Jiang et al., 2020)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule
from advfunc.core.arguments import require_non_negative, require_norm, require_positive, require_steps
from advfunc.core.divergence import symmetric_kl
from advfunc.core.model import LossFn
from advfunc.core.noise import gaussian
from advfunc.core.norms import l2_direction, linf_direction
from advfunc.core.params import Params
from advfunc.core.projection import project_l2, project_linf
from advfunc.core.step import Call
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, input_embedding


def smart_rule(
    target: EmbeddingOutput, epsilon: float, step_size: float, steps: int, noise_var: float, norm: str
) -> Rule:
    """δ₀ = σ·N(0, I); δ_k = Π_ε(δ_{k-1} + η · g_k/‖g_k‖), norms and ball per token over H."""
    direction_of = l2_direction if norm == "l2" else linf_direction

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        return {"embeds": gaussian(call.layout, noise_var, target.dtype, call.device, generator)}  # [B, L, H]

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        current = delta["embeds"]
        direction, finite = direction_of(grads["embeds"], -1)  # [B, L, H] fp32, unit norm per token
        moved = (current.float() + step_size * direction).to(current.dtype)
        projected = project_l2(moved, epsilon, -1) if norm == "l2" else project_linf(moved, epsilon)
        return {"embeds": projected}, finite

    return Rule(init, ascend, steps, reads_grads=False)


def smart(
    model: nn.Module,
    epsilon: float = 1e-5,
    step_size: float = 1e-3,
    steps: int = 1,
    noise_var: float = 1e-5,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Attack:
    """SMART's adversarial perturbation of the embedding output: ``delta = attack(params, batch)`` [B, L, H].

    .. math::
        δ_0 = σ · N(0, I),\\quad
        g_k = ∇_δ \\mathrm{sKL}\\big(f(x;θ), f(x + δ_{k-1};θ)\\big),\\quad
        δ_k = Π_ε\\big(δ_{k-1} + η · g_k/‖g_k‖\\big)

    f gives logits, sKL(p, q) = KL(p‖q) + KL(q‖p); ‖·‖ and Π_ε are per token over the
    hidden axis, L∞ (``norm="linf"``, the paper's) or L2. σ is ``noise_var`` multiplying a
    standard normal, as in the authors' code. The sKL is flat at δ = 0, so ``grads`` is
    accepted for the protocol and never read. Cost: one forward for f(x;θ) and K passes
    that differentiate δ only. Paper: Jiang et al., "SMART: Robust and Efficient
    Fine-Tuning for Pre-trained Natural Language Models through Principled Regularized
    Optimization", ACL 2020.
    """
    epsilon = require_positive("epsilon", epsilon)
    step_size = require_positive("step_size", step_size)
    steps = require_steps("steps", steps)
    noise_var = require_non_negative("noise_var", noise_var)
    norm = require_norm(norm)
    chosen = EmbeddingOutput(input_embedding(model))
    config = {
        "epsilon": epsilon,
        "step_size": step_size,
        "steps": steps,
        "noise_var": noise_var,
        "norm": norm,
        "target": "embeds",
    }
    rule = smart_rule(chosen, epsilon, step_size, steps, noise_var, norm)
    return Attack(
        "smart",
        model,
        chosen,
        rule,
        config,
        loss_fn=loss_fn,
        autocast=autocast,
        compile=compile,
        divergence=symmetric_kl,
        generator=generator,
    )
