"""Plain fine-tuning as a ``Step``: the no-attack baseline every method is compared with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.core.model import LossFn, PerturbedModel
from advfunc.core.step import Grads, Step, StepOutput, prepare
from advfunc.core.targets import resolve_target


def plain(model: nn.Module, *, loss_fn: LossFn | None = None, autocast: torch.dtype | None = None) -> Step:
    """Ordinary training on the clean loss, in the same pure ``(params, batch)`` form.

    .. math::
        \\text{grads} = ∇_θ L(θ, 0)

    Cost: 1 forward+backward pass. ``out.adv_loss`` equals ``out.loss`` and ``out.delta``
    is an empty tensor: nothing is perturbed. It exists so that a training loop, a
    benchmark or a comparison can treat "no adversarial training" as one more method.

    Example::

        step = plain(model)
        grads, out = step(advfunc.params_of(model), batch)
    """
    # The embedding-output target only serves prepare()'s batch validation: no offset is added.
    chosen = resolve_target(model, "embeds", allowed=("embeds",))
    perturbed = PerturbedModel(model, loss_fn, autocast)

    def step(
        params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch, loss_scale)
        leaves = {n: call.params[n].detach().requires_grad_(True) for n in call.trainable}
        loss, outputs = perturbed.loss({**call.params, **leaves}, call.kwargs, None)
        grads = torch.autograd.grad(loss * call.scale, list(leaves.values()), allow_unused=True, materialize_grads=True)
        logits = getattr(outputs, "logits", None)
        out = StepOutput(
            loss=loss.detach(),
            adv_loss=loss.detach(),
            delta=torch.zeros(0, device=call.device),
            skipped=torch.zeros((), dtype=torch.bool, device=call.device),
            logits=logits.detach() if isinstance(logits, torch.Tensor) else None,
        )
        return dict(zip(leaves, grads, strict=True)), out

    return Step("none", 1, {"forward_only_passes": 0}, step)
