"""Free adversarial training's perturbation update: one signed step from the carried δ (Shafahi et al., 2019)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule, zero_init
from advfunc.core.arguments import require_norm, require_positive
from advfunc.core.model import LossFn
from advfunc.core.norms import l2_direction
from advfunc.core.params import Params
from advfunc.core.projection import project_l2, project_linf
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, input_embedding


def free_at_rule(target: EmbeddingOutput, epsilon: float, alpha: float, norm: str) -> Rule:
    """δ' = Π_ε(δ + α · sign(G)) (linf) or Π_ε(δ + α · G/‖G‖₂) (l2, per example); padding zeroed."""

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        assert layout.mask is not None
        current, grad = delta["embeds"], grads["embeds"]  # [B, L, H]
        if norm == "linf":
            finite = torch.isfinite(grad).all()
            direction = torch.where(torch.isfinite(grad), torch.sign(grad), torch.zeros_like(grad)).float()
        else:
            direction, finite = l2_direction(grad, (1, 2))
        moved = ((current.float() + alpha * direction) * layout.mask).to(current.dtype)  # [B, L, H]
        projected = project_linf(moved, epsilon) if norm == "linf" else project_l2(moved, epsilon, (1, 2))
        return {"embeds": projected}, finite

    return Rule(zero_init(target), ascend, 1)


def free_at(
    model: nn.Module,
    epsilon: float = 0.01,
    alpha: float | None = None,
    norm: str = "linf",
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Attack:
    """One replay's update of free adversarial training: ``delta = attack(params, batch, grads, start=δ)``.

    .. math::
        G = ∇_δ L(θ, δ),\\quad
        δ' = Π_ε\\big(δ + α · \\operatorname{sign}(G)\\big)\\ (\\text{linf})\\ \\text{or}\\
             Π_ε\\big(δ + α · G/‖G‖₂\\big)\\ (\\text{l2})

    δ is ``start`` (zero by default; then this is FGSM in an L∞ ball), [B, L, H]; α
    defaults to ε (Shafahi et al.'s step). Π_ε clamps elementwise (linf) or rescales per
    example over (seq, hidden) (l2); padding positions of δ' are zero. Cost: 1 pass that
    differentiates δ only, none when ``grads`` (the gradient at ``start``) is given.
    Paper: Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019.
    """
    epsilon = require_positive("epsilon", epsilon)
    alpha = epsilon if alpha is None else require_positive("alpha", alpha)
    norm = require_norm(norm)
    chosen = EmbeddingOutput(input_embedding(model))
    config = {"epsilon": epsilon, "alpha": alpha, "norm": norm, "target": "embeds"}
    rule = free_at_rule(chosen, epsilon, alpha, norm)
    return Attack("free_at", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, compile=compile)
