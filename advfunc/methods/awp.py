"""AWP training: adversarial weight perturbation, as NLP practitioners run it (Wu et al., 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.model import LossFn
from advfunc.core.step import Step
from advfunc.methods.recipes import clean_and_adversarial


def awp(
    model: nn.Module,
    adv_lr: float = 1.0,
    adv_eps: float = 0.01,
    adv_steps: int = 1,
    *,
    names: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """Adversarial Weight Perturbation: train on the clean loss and the loss at perturbed weights.

    .. math::
        w_0 = w,\\quad g_t = ∇_w L(w_{t-1}),\\quad
        w_t = \\operatorname{clamp}\\big(w_{t-1} + η · g_t/‖g_t‖₂ · ‖w_{t-1}‖₂,\\;
            w − ε|w|,\\; w + ε|w|\\big),\\\\
        \\text{grads} = ∇_θ L(θ) + ∇_θ L(θ)\\big|_{w = w_K}

    for each selected weight w separately (η = ``adv_lr``, ε = ``adv_eps``, K =
    ``adv_steps``); w_K − w is :func:`advfunc.attacks.awp`. Default selection:
    :func:`advfunc.awp_parameters`; ``names=[...]`` picks trainable parameters by exact
    name. The perturbed weights are only a params dict handed to ``functional_call``;
    the model's tensors are never written. This is :func:`advfunc.pgd`'s recipe with a
    weight rule in place of the L2 ball.

    ``out``: ``loss`` the clean loss, ``adv_loss`` the loss at w_K, ``delta`` the dict
    {name: w_K − w}.

    Cost: K + 1 forward+backward passes: the clean pass (g_1 comes with it), K − 1
    passes that differentiate the selected weights only, the full pass at w_K.

    Paper: Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust Generalization",
    NeurIPS 2020; the relative step and box are those of the AWP class common in
    Kaggle NLP solutions.

    Example::

        awp_step = advfunc.awp(model, adv_lr=1.0, adv_eps=0.01)
        grads, out = awp_step(advfunc.params_of(model), batch)
        advfunc.set_grads(model, grads); optimizer.step()
    """
    attack = attacks.awp(
        model, adv_lr, adv_eps, adv_steps, names=names, loss_fn=loss_fn, autocast=autocast, compile=compile
    )
    return clean_and_adversarial("awp", attack, passes=adv_steps + 1)
