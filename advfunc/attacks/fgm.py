"""FGM: one normalised gradient step (Miyato et al., 2017); PGD with one step of size ε."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack
from advfunc.attacks.pgd import pgd_rule
from advfunc.core.arguments import require_positive
from advfunc.core.model import LossFn
from advfunc.core.targets import TargetSpec, resolve_target


def fgm(
    model: nn.Module,
    epsilon: float = 1.0,
    *,
    target: TargetSpec = "weight",
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Attack:
    """The fast gradient method: ``delta = attack(params, batch, grads=None)``.

    .. math::
        G = ∇_δ L(θ, 0),\\quad δ = ε · G / ‖G‖₂ \\;(δ = 0 \\text{ when } ‖G‖ = 0)

    This is :func:`advfunc.attacks.pgd` with ``steps=1`` and ``alpha=epsilon``: from δ = 0
    one step of length ε lands on the ball's surface. The norm is the target's: over the
    whole embedding-matrix gradient (``"weight"``), per example (``"embeds"``), per
    parameter (names). Cost: 1 pass that differentiates δ only, none when ``grads`` is
    given. Paper: Miyato, Dai & Goodfellow, "Adversarial Training Methods for
    Semi-Supervised Text Classification", ICLR 2017.
    """
    epsilon = require_positive("epsilon", epsilon)
    chosen = resolve_target(model, target)
    rule = pgd_rule(chosen, epsilon, epsilon, 1)
    config = {"epsilon": epsilon, "target": chosen.kind}
    return Attack("fgm", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, compile=compile)
