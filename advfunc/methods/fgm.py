"""FGM training: the fast gradient method on the embedding (Miyato et al., 2017)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.model import LossFn
from advfunc.core.step import Step
from advfunc.core.targets import TargetSpec
from advfunc.methods.recipes import clean_and_adversarial


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

    r is :func:`advfunc.attacks.fgm`, which is PGD with one step of size ε; so this step
    is :func:`advfunc.pgd` with ``steps=1, alpha=epsilon``. The norm is the target's:
    over the whole embedding-matrix gradient (``"weight"``, the classic FGM class's), per
    example over (seq, hidden) (``"embeds"``), per parameter (names).
    Cost: 2 forward+backward passes. Paper: Miyato, Dai & Goodfellow, "Adversarial
    Training Methods for Semi-Supervised Text Classification", ICLR 2017.

    Example::

        step = advfunc.fgm(model, epsilon=1.0)
        grads, out = step(advfunc.params_of(model), batch)  # out.delta: [N, H] rows
    """
    attack = attacks.fgm(model, epsilon, target=target, loss_fn=loss_fn, autocast=autocast, compile=compile)
    return clean_and_adversarial("fgm", attack, passes=2)
