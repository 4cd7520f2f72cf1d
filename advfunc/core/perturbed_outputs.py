"""f(θ, δ) as a pure function: the model's outputs at a perturbation, for evaluating an attack's δ."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from advfunc.core.engine import Engine
from advfunc.core.model import PerturbedModel
from advfunc.core.step import prepare
from advfunc.core.targets import PublicDelta, TargetSpec, resolve_target

OutputsAt = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any], "PublicDelta | None"], Any]


def perturbed_outputs(
    model: nn.Module, target: TargetSpec = "weight", *, autocast: torch.dtype | None = None
) -> OutputsAt:
    """``outputs_at(params, batch, delta)``: the model's outputs (``.logits``, ``.loss``) with δ placed by the target.

    .. math::
        \\text{outputs\\_at}(θ, x, δ) = f_θ(x \\oplus δ)

    where ⊕ places δ as :func:`advfunc.perturbed_loss` does: [B·L, H] rows of the batch's
    tokens (``"weight"``), [B, L, H] added to the embedding output (``"embeds"``,
    ``"embeds@prompt"``) or to a submodule's output (a module name), or {name: tensor}
    added to those parameters; ``delta=None`` is the clean forward (δ = 0). ``delta`` is
    what an attack of :mod:`advfunc.attacks` on the same target returns, so an attack's
    effect is read in two lines::

        delta = advfunc.attacks.pgd(model, epsilon=0.1, alpha=0.05, steps=3, target="embeds")(params, batch)
        logits = advfunc.perturbed_outputs(model, "embeds")(params, batch, delta).logits

    One forward; differentiable in ``params`` and ``delta`` (wrap it in ``torch.no_grad()``
    to evaluate). ``batch`` needs no labels. Pure: the model, its mode and ``params`` are
    untouched.
    """
    chosen = resolve_target(model, target)
    perturbed = PerturbedModel(model, None, autocast, chosen.modules)
    engine = Engine(perturbed, chosen, compiled=False)

    def outputs_at(params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], delta: PublicDelta | None) -> Any:
        call = prepare(model, perturbed, chosen, params, batch, needs_loss=False)
        placed = call.zeros(chosen) if delta is None else chosen.internal(delta, call.layout, call.params, "delta")
        with perturbed.hooked(count=False):
            return engine.outputs(call.params, call.kwargs, call.layout, placed)

    return outputs_at
