"""Activation (gradient) checkpointing that recomputes the forward advfunc ran, not the module's own.

A step runs the model through ``functional_call``: the parameters it differentiates
(fresh leaves, detached copies, AWP's perturbed weights, a teacher's) and the
perturbation offsets are substituted into the modules for the length of one forward.
Non-reentrant checkpointing (``model.gradient_checkpointing_enable(...)``, as TRL and
PEFT run it) recomputes each checkpointed layer during the backward, after that
substitution has ended: the recompute would read the module's own parameters. A pass
that differentiates δ only then saves tensors the forward did not (``CheckpointError``:
"Recomputed values … have different metadata"), and a pass at perturbed weights gets
gradients at the wrong weights without any error.

:func:`replayable_checkpoints` makes each checkpointed layer record, when its forward
runs, the tensors it is reading (parameters, buffers, offsets), and substitutes exactly
those again for its recompute (``checkpoint``'s ``context_fn``). The gradients are then
those without checkpointing, at the memory of checkpointing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from advfunc.core.targets import OFFSET_ATTRIBUTE

_FUNC = "_gradient_checkpointing_func"


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The modules a Hugging Face model checkpoints: ``gradient_checkpointing`` on, a checkpoint function set."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and hasattr(m, _FUNC)]


def _tensors_read(layer: nn.Module) -> dict[str, torch.Tensor]:
    """What ``layer``'s forward reads now: parameters and buffers (substituted ones included) and offsets."""
    state: dict[str, torch.Tensor] = dict(layer.named_parameters(remove_duplicate=False))
    state.update(layer.named_buffers(remove_duplicate=False))
    for name, module in layer.named_modules():
        offset = module.__dict__.get(OFFSET_ATTRIBUTE)
        if isinstance(offset, torch.Tensor):
            state[f"{name}.{OFFSET_ATTRIBUTE}" if name else OFFSET_ATTRIBUTE] = offset
    return state


def _refuse_reentrant(func: Any) -> None:
    keywords = getattr(func, "keywords", {}) if isinstance(func, functools.partial) else {}
    if keywords.get("use_reentrant", False):
        raise ValueError(
            "advfunc's steps need non-reentrant activation checkpointing (use_reentrant=True cannot "
            "differentiate with torch.autograd.grad); enable it with model.gradient_checkpointing_enable("
            'gradient_checkpointing_kwargs={"use_reentrant": False})'
        )


def _replaying(layer: nn.Module, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (the layer's checkpoint function) with a recompute that reads what the forward read."""
    user_context = getattr(func, "keywords", {}).get("context_fn") if isinstance(func, functools.partial) else None

    def checkpointed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        state = _tensors_read(layer)

        def contexts() -> tuple[Any, Any]:
            forward, recompute = user_context() if user_context is not None else (contextlib.nullcontext(),) * 2

            @contextlib.contextmanager
            def replay() -> Iterator[None]:
                with _reparametrize_module(layer, state), recompute:
                    yield

            return forward, replay()

        return func(function, *args, context_fn=contexts, **kwargs)

    checkpointed.advfunc_replaying = True  # type: ignore[attr-defined]
    return checkpointed


@contextlib.contextmanager
def replayable_checkpoints(model: nn.Module) -> Iterator[None]:
    """For one forward of ``model``: every checkpointed layer's recompute reads the tensors its forward read.

    Nothing changes for a model without checkpointing. The layers' checkpoint functions
    are restored on exit; a recompute after that still replays what it recorded.
    """
    if torch.compiler.is_compiling():
        # A compiled step traces each checkpoint with the tensors of its trace: nothing to replay.
        yield
        return
    swapped = []
    for layer in checkpointed_layers(model):
        func = getattr(layer, _FUNC)
        if getattr(func, "advfunc_replaying", False):
            continue  # a step nested in another step's forward: already replaying
        _refuse_reentrant(func)
        swapped.append((layer, func))
        setattr(layer, _FUNC, _replaying(layer, func))
    try:
        yield
    finally:
        for layer, func in swapped:
            setattr(layer, _FUNC, func)
