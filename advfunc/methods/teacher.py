"""The teacher θ̃ of SMART's proximal term, as pure functions of parameter dicts, and the state that carries it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from advfunc.core.params import Params, trainable_names
from advfunc.core.stateful import State, StatefulStep, Update
from advfunc.core.step import Grads, StepOutput


def teacher_of(params: Mapping[str, torch.Tensor]) -> Params:
    """A copy of ``params`` to start the teacher from: θ̃₀ = θ₀.

    A copy, because ``advfunc.params_of(model)`` shares storage with the model and the
    optimizer updates it in place: an uncopied teacher would follow θ exactly.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping name -> tensor, got {type(params).__name__}")
    return {name: value.detach().clone() for name, value in params.items()}


def ema(teacher: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], beta: float) -> Params:
    """The exponential moving average update, returned as a new dict; nothing is mutated.

    .. math::
        θ̃ ← β · θ̃ + (1 − β) · θ

    for every name of ``teacher`` (a teacher may hold only the trainable parameters).
    ``params`` must have each of those names with the same shape. Non-floating tensors
    are kept as they are. SMART uses β = 0.99 (Jiang et al., 2020, §3.2).

    Example::

        teacher = advfunc.teacher_of(advfunc.params_of(model))
        ...  # after each optimizer step:
        teacher = advfunc.ema(teacher, advfunc.params_of(model), beta=0.99)
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {beta!r} ({type(beta).__name__})")
    if not math.isfinite(beta) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1] (0.99 in SMART), got {beta!r}")
    if not isinstance(teacher, Mapping) or not isinstance(params, Mapping):
        raise TypeError(
            f"teacher and params must be mappings name -> tensor, got {type(teacher).__name__} and "
            f"{type(params).__name__}"
        )
    missing = sorted(set(teacher) - set(params))
    if missing:
        raise ValueError(f"params lacks the teacher's names {missing[:5]}; pass advfunc.params_of(model)")
    updated: Params = {}
    for name, old in teacher.items():
        new = params[name]
        if new.shape != old.shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(new.shape)}, the teacher's has {tuple(old.shape)}")
        if not old.is_floating_point():
            updated[name] = old
            continue
        updated[name] = (beta * old.detach() + (1 - beta) * new.detach().to(old.dtype)).detach()
    return updated


def copy_of_trainable(model: nn.Module, key: str) -> Callable[[Mapping[str, torch.Tensor]], State]:
    """A stateful ``start``: ``{key: a copy of the trainable parameters at the start}`` (θ̃₀ = θ₀, LAT's reference)."""
    trainable = trainable_names(model)

    def start(params: Mapping[str, torch.Tensor]) -> State:
        return {key: teacher_of({name: params[name] for name in trainable if name in params})}

    return start


def passing(key: str) -> Update:
    """A stateful ``carry``: ``step(params, batch, state[key], **keywords)``, the state kept."""

    def carry(
        step: StatefulStep, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], state: State, **keywords: Any
    ) -> tuple[Grads, StepOutput, State]:
        return (*step(params, batch, state[key], **keywords), state)

    return carry
