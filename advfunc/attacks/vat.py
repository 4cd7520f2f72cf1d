"""VAT's perturbation: power iteration toward the most sensitive direction (Miyato et al., 2017)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule
from advfunc.core.arguments import require_positive, require_steps
from advfunc.core.divergence import kl_logits
from advfunc.core.model import LossFn
from advfunc.core.noise import gaussian
from advfunc.core.norms import l2_direction
from advfunc.core.params import Params
from advfunc.core.step import Call
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, input_embedding


def vat_rule(target: EmbeddingOutput, epsilon: float, xi: float, power_iters: int) -> Rule:
    """r₀ = ξ·d₀/‖d₀‖, d₀ ~ N(0, I); r_k = ξ·d_k/‖d_k‖ with d_k = ∇_r KL at r_{k-1}; r = (ε/ξ)·r_K."""

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        d = gaussian(call.layout, 1.0, target.dtype, call.device, generator)  # [B, L, H]
        unit, _ = l2_direction(d, (1, 2))
        return {"embeds": (xi * unit).to(target.dtype)}

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        unit, finite = l2_direction(grads["embeds"], (1, 2))
        return {"embeds": (xi * unit).to(delta["embeds"].dtype)}, finite

    def finish(delta: Delta) -> Delta:
        return {"embeds": (delta["embeds"].float() * (epsilon / xi)).to(delta["embeds"].dtype)}

    return Rule(init, ascend, power_iters, reads_grads=False, finish=finish)


def vat(
    model: nn.Module,
    epsilon: float = 1.0,
    xi: float = 0.1,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Attack:
    """The virtual adversarial direction on the embedding output: ``r = attack(params, batch)`` [B, L, H].

    .. math::
        p = p(y|x;θ),\\quad d_0 \\sim N(0, I),\\quad
        d_k = ∇_r \\mathrm{KL}\\big(p ‖ p(y|x + r;θ)\\big)\\big|_{r = ξ d_{k-1}/‖d_{k-1}‖₂},\\quad
        r = ε · d_K / ‖d_K‖₂

    ‖·‖₂ is per example over (seq, hidden), padding masked. The batch needs no labels.
    The KL is flat at r = 0 (its gradient there is exactly zero, which is why VAT starts
    from a random direction), so ``grads`` is accepted for the protocol and never read.
    ξ must be large enough that p(y|x + r) differs from p(y|x) in the model's precision
    (≈ 0.1 per example in float32). Cost: one forward for p and K passes that
    differentiate r only. Paper: Miyato, Dai & Goodfellow, ICLR 2017; Miyato et al.,
    "Virtual Adversarial Training", TPAMI 2018.
    """
    epsilon = require_positive("epsilon", epsilon)
    xi = require_positive("xi", xi)
    power_iters = require_steps("power_iters", power_iters)
    chosen = EmbeddingOutput(input_embedding(model))
    config = {"epsilon": epsilon, "xi": xi, "power_iters": power_iters, "target": "embeds"}
    rule = vat_rule(chosen, epsilon, xi, power_iters)
    return Attack(
        "vat",
        model,
        chosen,
        rule,
        config,
        loss_fn=loss_fn,
        autocast=autocast,
        compile=compile,
        divergence=kl_logits,
        generator=generator,
    )
