"""L(θ, δ) as a pure function: the unit every attack differentiates and every step trains on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from advfunc.core.engine import Engine
from advfunc.core.model import LossFn, PerturbedModel
from advfunc.core.step import prepare
from advfunc.core.targets import PublicDelta, TargetSpec, resolve_target

LossAt = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any], PublicDelta], torch.Tensor]


def perturbed_loss(
    model: nn.Module,
    target: TargetSpec = "weight",
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
) -> LossAt:
    """``loss_at(params, batch, delta) -> L(θ, δ)``, a scalar differentiable in ``params`` and ``delta``.

    .. math::
        L(θ, δ) = \\text{loss of } f_θ \\text{ with } δ \\text{ placed by the target}

    ``delta`` has the target's public form: [B·L, H] rows of the batch's tokens
    (``"weight"``, as an attack returns them), [B, L, H] added to the embedding output
    (``"embeds"``) or to a submodule's output (a module name), or {name: tensor} added to
    those parameters. ``params`` may hold only
    some names (the rest are the model's own). One forward; differentiate it with
    ``torch.func.grad`` or ``torch.autograd.grad`` to write any objective around an attack::

        loss_at = advfunc.perturbed_loss(model, target="embeds")
        g_theta, g_delta = torch.func.grad(loss_at, argnums=(0, 2))(params, batch, delta)
    """
    chosen = resolve_target(model, target)
    perturbed = PerturbedModel(model, loss_fn, autocast, chosen.modules)
    engine = Engine(perturbed, chosen, compiled=False)

    def loss_at(params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], delta: PublicDelta) -> torch.Tensor:
        call = prepare(model, perturbed, chosen, params, batch)
        placed = chosen.internal(delta, call.layout, call.params, "delta")
        with perturbed.hooked(count=False):
            return engine.loss(call.params, call.kwargs, call.layout, placed)[0]

    return loss_at
