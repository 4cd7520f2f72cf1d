"""The recipe several methods share: train on the clean loss and the loss at the attack's δ.

.. math::
    \\text{grads} = ∇_θ L(θ, 0) + ∇_θ L(θ, δ),\\quad δ = \\text{attack}(θ, \\text{batch}, ∇_δ L(θ, 0))

The clean pass gives both ∇_θ L(θ, 0) and the attack's first gradient, so the attack
spends only its later δ-only passes; the adversarial pass adds its parameter gradients
into the clean pass's buffers, so a step holds one gradient dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from advfunc.attacks.attack import Attack
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired, prepare, report


def clean_and_adversarial(method: str, attack: Attack, passes: int) -> Step:
    """The step ``grads = ∇_θ L(θ, 0) + ∇_θ L(θ, attack(θ, batch))`` for ``attack``.

    ``passes`` is its cost in forward+backward passes, δ-only passes counted as one.
    """
    engine, target = attack.engine, attack.target

    def step(
        params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        call = prepare(attack.model, attack.perturbed, target, params, batch, loss_scale)
        with attack.perturbed.hooked(count=not attack.compiled) as calls:
            # final=False: the embedding gradient stays [B, L, H] until the adversarial pass ends.
            zero = call.zeros(target)
            clean = engine.full(call, zero, with_delta_grad=True, final=False)
            check_hook_fired(calls, target)
            # The rules of these methods start at δ = 0: the clean pass's zeros are that start.
            delta, skipped = attack.run(call, clean.delta_grads, start=zero)
            adv = engine.full(call, delta, with_delta_grad=False, accumulate_into=clean.param_grads)
        grads = adv.param_grads  # clean + adversarial, summed in the clean pass's buffers
        return grads, report(target, call.layout, delta, clean.loss, adv.loss, skipped, clean.logits)

    return Step(method, passes, {**attack.config, "forward_only_passes": 0}, step)
