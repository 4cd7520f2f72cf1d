"""PGD training: projected gradient ascent on the embedding (Madry et al., 2018)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.model import LossFn
from advfunc.core.step import Step
from advfunc.core.targets import TargetSpec
from advfunc.methods.recipes import clean_and_adversarial


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
) -> Step:
    """Projected Gradient Descent adversarial training, the classic K-step loop.

    .. math::
        δ_0 = 0,\\quad G_t = ∇_δ L(θ, δ_{t-1}),\\quad
        δ_t = Π_ε(δ_{t-1} + α · G_t / ‖G_t‖₂),\\quad
        \\text{grads} = ∇_θ L(θ, 0) + ∇_θ L(θ, δ_K)

    δ_K is :func:`advfunc.attacks.pgd`. Π_ε is the L2 ball of radius ε around the
    unperturbed target, with the target's norm (whole matrix for ``"weight"``, per
    example for ``"embeds"``, per parameter for names). G_1 comes free with the clean
    pass; G_2..G_K are passes that differentiate δ only. Cost: 2 full forward+backward
    passes + (K−1) passes with no parameter gradient; with ``compile`` (default: on
    CUDA) every pass runs under ``torch.compile(fullgraph=True)``. ``steps=1,
    alpha=epsilon`` is :func:`advfunc.fgm`. Paper: Madry et al., "Towards Deep Learning
    Models Resistant to Adversarial Attacks", ICLR 2018.

    Example::

        pgd_step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=3)
        grads, out = pgd_step(params, batch)
        advfunc.set_grads(model, grads); optimizer.step()
    """
    attack = attacks.pgd(
        model, epsilon, alpha, steps, target=target, loss_fn=loss_fn, autocast=autocast, compile=compile
    )
    return clean_and_adversarial("pgd", attack, passes=steps + 1)
