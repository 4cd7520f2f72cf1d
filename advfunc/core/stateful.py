"""Methods with state of their own, in optax's ``init`` / ``update`` shape.

Most steps are pure functions of ``(params, batch)``. A few carry something between
calls: SMART its EMA teacher θ̃, free adversarial training the perturbation δ it replays.
One protocol drives them all, so a training loop never asks which method it runs::

    step = advfunc.stateful(advfunc.smart(model))      # any Step: a plain one carries {}
    state = step.init(params)
    for batch in loader:
        for _ in range(step.replays):                   # free AT: m replays of each batch
            grads, out, state = step.update(params, batch, state)
            advfunc.set_grads(model, grads); optimizer.step()
            state = step.after_update(state, params)    # SMART: θ̃ ← β θ̃ + (1 − β) θ

The state is a dict of tensors, dicts of tensors, numbers and None, so ``torch.save``
and ``torch.load(weights_only=True)`` round-trip it (a checkpoint holds it as it is).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from advfunc.core.step import Grads, Step, StepOutput

State = dict[str, Any]
# (step, params, batch, state, **keywords for the step's own call) -> (grads, out, state)
Update = Callable[..., tuple[Grads, StepOutput, State]]


def _no_state(params: Mapping[str, torch.Tensor]) -> State:
    return {}


def _stateless(
    step: StatefulStep, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], state: State, **keywords: Any
) -> tuple[Grads, StepOutput, State]:
    return (*step(params, batch, **keywords), state)


def _unchanged(state: State, params: Mapping[str, torch.Tensor]) -> State:
    return state


@dataclass(frozen=True)
class StatefulStep(Step):
    """A :class:`Step` with the ``init`` / ``update`` / ``after_update`` protocol.

    It is still callable the method's own way (``smart_step(params, batch, teacher)``,
    ``free_step(params, batch, delta)``); the protocol is the one shape every method
    shares. ``replays``: how many times in a row a loop feeds each batch, with an
    optimizer step after each (free AT's m; 1 for every other method).
    """

    start: Callable[[Mapping[str, torch.Tensor]], State] = field(default=_no_state, repr=False)
    carry: Update = field(default=_stateless, repr=False)
    advance: Callable[[State, Mapping[str, torch.Tensor]], State] = field(default=_unchanged, repr=False)
    replays: int = 1

    @property
    def carries_state(self) -> bool:
        """Whether the method keeps state between calls (a checkpoint must then hold it)."""
        return self.start is not _no_state

    def init(self, params: Mapping[str, torch.Tensor]) -> State:
        """The state before the first step, from the parameters at the start of training."""
        return self.start(params)

    def update(
        self, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], state: State, **keywords: Any
    ) -> tuple[Grads, StepOutput, State]:
        """One step on ``batch`` from ``state``: ``grads, out, state``; nothing is mutated.

        ``keywords`` go to the step's own call (CAT's and LAT's ``away_scale``).
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                "state must be the dict that step.init(params) returned (or a later update's), "
                f"got {type(state).__name__}"
            )
        return self.carry(self, params, batch, dict(state), **keywords)

    def after_update(self, state: State, params: Mapping[str, torch.Tensor]) -> State:
        """The state after an optimizer step has moved the parameters to ``params``."""
        return self.advance(dict(state), params)


def stateful(step: Step) -> StatefulStep:
    """``step`` with the ``init`` / ``update`` / ``after_update`` protocol (a stateless one carries ``{}``)."""
    if isinstance(step, StatefulStep):
        return step
    if not isinstance(step, Step):
        raise TypeError(f"stateful takes an advfunc Step (from a method factory), got {type(step).__name__}")
    return StatefulStep(**{f.name: getattr(step, f.name) for f in fields(Step)})
