"""PGD: projected gradient ascent on the loss (Madry et al., 2018)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule, zero_init
from advfunc.core.arguments import require_positive, require_steps
from advfunc.core.model import LossFn
from advfunc.core.norms import l2_direction
from advfunc.core.params import Params
from advfunc.core.projection import project_l2
from advfunc.core.targets import Delta, Layout, Target, TargetSpec, resolve_target


def pgd_rule(target: Target, epsilon: float, alpha: float, steps: int) -> Rule:
    """δ₀ = 0, δ_t = Π_ε(δ_{t-1} + α · G_t/‖G_t‖₂), with the target's norm groups.

    A zero or non-finite G leaves δ where it is (the classic ``if norm != 0``).
    """

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        moved: Delta = {}
        finite_all = torch.ones((), dtype=torch.bool, device=next(iter(delta.values())).device)
        for key, value in delta.items():
            dims = target.norm_dims(value)
            direction, finite = l2_direction(grads[key], dims)
            finite_all = finite_all & finite
            moved[key] = project_l2((value.float() + alpha * direction).to(value.dtype), epsilon, dims)
        return moved, finite_all

    return Rule(zero_init(target), ascend, steps)


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
) -> Attack:
    """Projected gradient ascent in an L2 ball: ``delta = attack(params, batch, grads=None)``.

    .. math::
        δ_0 = 0,\\quad G_t = ∇_δ L(θ, δ_{t-1}),\\quad
        δ_t = Π_ε(δ_{t-1} + α · G_t / ‖G_t‖₂),\\quad δ = δ_K

    Π_ε is the L2 ball of radius ε with the target's norm: the whole matrix for
    ``"weight"`` (δ: [B·L, H] rows of the batch's tokens), per example over (seq, hidden)
    for ``"embeds"`` (δ: [B, L, H], padding masked), per parameter for a list of names
    (δ: {name: tensor}). G_1 is ``grads`` when given.

    Cost: K passes that differentiate δ only (K − 1 when ``grads`` is given); with
    ``compile`` each is one compiled graph with its ascent. Paper: Madry et al., "Towards
    Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

    Example::

        attack = advfunc.attacks.pgd(model, epsilon=1.0, alpha=0.3, steps=3, target="embeds")
        delta = attack(params, batch)                       # [B, L, H]
    """
    epsilon = require_positive("epsilon", epsilon)
    alpha = require_positive("alpha", alpha)
    steps = require_steps("steps", steps)
    chosen = resolve_target(model, target)
    config = {"epsilon": epsilon, "alpha": alpha, "steps": steps, "target": chosen.kind}
    rule = pgd_rule(chosen, epsilon, alpha, steps)
    return Attack("pgd", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, compile=compile)
