"""The layers before a module target, run once per step: the δ-only passes replay their outputs.

δ added at the output of layer k of a layer stack (``"model.layers.k"``) changes nothing
before it, and θ is fixed within a step, so the outputs of layers 0..k are the same in
every pass of the step that differentiates δ only. The first such pass records them;
the later ones replay them, each of those layers' ``forward`` replaced for the length of
the forward by a function returning what it returned, so only the embedding, the layers
after k and the head run (the layers' forward hooks still run: the offset hook adds δ
to the replayed output of layer k). A target inside a layer (``"model.layers.k.mlp"``)
replays layers 0..k−1. The backward of a δ-only pass already stops at δ.

Cost: a δ-only pass at layer k of N skips k + 1 of the N layers' forwards (and, under
activation checkpointing, whose input hook makes the embedding output require grad,
their backward); the recording pass is an ordinary one. Nothing is replayed when the
stack does not run each layer exactly once, in order (a shared layer, a skipped one:
the recording pass checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from advfunc.core.targets import ModuleOutput, Target

_ABSENT = object()


@dataclass(frozen=True)
class PrefixPlan:
    """A layer stack in its running order; ``stack[:end]`` do not depend on δ and are replayed."""

    stack: tuple[nn.Module, ...]
    end: int


def prefix_plan(model: nn.Module, target: Target) -> PrefixPlan | None:
    """The plan for a module target inside one ``nn.ModuleList`` of ``model``; None when nothing can be replayed.

    Each perturbed module must be an element of the list (its output is cached too) or
    inside one (that element runs); the prefix ends at the first such element.
    """
    if not isinstance(target, ModuleOutput):
        return None
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    ends = []
    for name in target.module_names:
        found = None
        for prefix, stack in stacks:
            rest = name.removeprefix(f"{prefix}.")
            index, _, inner = rest.partition(".")
            if rest != name and index.isdigit() and int(index) < len(stack):
                found = (stack, int(index) + (not inner))  # the element itself is replayed; a module inside it is not
                break  # the outermost stack: named_modules lists parents first
        if found is None:
            return None
        ends.append(found)
    lists = {id(stack) for stack, _ in ends}
    end = min(e for _, e in ends)
    if len(lists) != 1 or end == 0:
        return None
    return PrefixPlan(tuple(ends[0][0]), end)


def _swapped_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Set ``module.forward`` to ``forward``; return the function that puts back what was there."""
    before = module.__dict__.get("forward", _ABSENT)
    module.forward = forward

    def restore() -> None:
        if before is _ABSENT:
            del module.forward
        else:
            module.forward = before

    return restore


class PrefixCache:
    """One step's recorded prefix outputs: :meth:`forward` records them in its first block, replays them after."""

    def __init__(self, plan: PrefixPlan) -> None:
        self.plan = plan
        self.outputs: list[Any] | None = None
        self.usable = True

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Hold for one forward of a δ-only pass (not its backward); every forward swapped is restored on exit."""
        if not self.usable:
            yield
        elif self.outputs is None:
            with self._recording():
                yield
        else:
            with self._replaying():
                yield

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        calls: list[tuple[int, Any]] = []
        restores = []
        try:
            for index, layer in enumerate(self.plan.stack):
                restores.append(_swapped_forward(layer, _recorder(index, layer.forward, calls)))
            yield
        finally:
            for restore in restores:
                restore()
        self.usable = [index for index, _ in calls] == list(range(len(self.plan.stack)))
        # Detached: nothing before the target depends on δ, the only input a δ-only pass
        # differentiates (a graph here comes from checkpointing's requires_grad_ input hook).
        self.outputs = [tree_map(_detached, output) for _, output in calls[: self.plan.end]] if self.usable else None

    @contextlib.contextmanager
    def _replaying(self) -> Iterator[None]:
        assert self.outputs is not None
        restores = []
        try:
            for layer, output in zip(self.plan.stack, self.outputs, strict=False):
                restores.append(_swapped_forward(layer, _replayer(output, layer.forward)))
            yield
        finally:
            for restore in restores:
                restore()


def _recorder(index: int, forward: Callable[..., Any], calls: list[tuple[int, Any]]) -> Callable[..., Any]:
    def recording(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        calls.append((index, output))
        return output

    return recording


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _replayer(output: Any, forward: Callable[..., Any]) -> Callable[..., Any]:
    """The recorded output for the pass's first call; the layer's own forward for any later one.

    A later call is another forward inside the same pass (a ``loss_fn`` that runs the
    model again), whose inputs the recording never saw.
    """
    served = False

    def replay(*args: Any, **kwargs: Any) -> Any:
        nonlocal served
        if served:
            return forward(*args, **kwargs)
        served = True
        return output

    return replay
