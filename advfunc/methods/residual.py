"""The residual stream of a decoder, read and rewritten by name: what ReFAT and rerouting train on.

Both methods work on the hidden states [B, L, H] that named layers return (the first
element when a layer returns a tuple), the places a module target names
(``"model.layers.4"``). Their batches mix two kinds of rows, told apart by a ``[B]``
flag under :data:`HARMFUL` that advfunc consumes and never passes to the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from advfunc.attacks.lat import middle_layer
from advfunc.core.targets import ModuleOutput, resolve_target

HARMFUL = "harmful"  # batch key: [B] bool, true for the rows of the harmful set

# edit(layer name, hidden states [B, L, H]) -> replacement, or None to leave them as they are
Edit = Callable[[str, torch.Tensor], torch.Tensor | None]


def layer_target(model: nn.Module, layers: str | Sequence[str] | None) -> ModuleOutput:
    """The layers as a module target: one name (``"model.layers.4"``), several, or None for the middle layer."""
    if layers is None:
        layers = middle_layer(model)
    names = [layers] if isinstance(layers, str) else list(layers)
    chosen = resolve_target(model, names, allowed=("embeds",))
    if not isinstance(chosen, ModuleOutput):
        raise ValueError(f"layers must name submodules of the model (such as 'model.layers.4'), got {layers!r}")
    return chosen


@contextlib.contextmanager
def edited(target: ModuleOutput, edit: Edit) -> Iterator[None]:
    """Forward hooks, held for the block, that pass each layer's hidden states to ``edit``.

    ``functional_call`` runs module hooks, so the hooks see every forward of the model
    in the block, pure or not; they are removed when the block ends, even on error.
    """

    def hook_of(name: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
                raise ValueError(f"layer {name!r} returned {got}, not hidden states [batch, seq, hidden]")
            replaced = edit(name, hidden)
            if replaced is None:
                return None
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return hook

    handles = [
        module.register_forward_hook(hook_of(name))
        for name, module in zip(target.module_names, target.modules, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def captured(target: ModuleOutput) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict that each forward in the block fills with ``{layer: hidden states [B, L, H]}``."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, hidden: torch.Tensor) -> None:
        seen[name] = hidden

    with edited(target, keep):
        yield seen


def harmful_rows(batch: Mapping[str, Any], method: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the batch's :data:`HARMFUL` flag as [B] bool, the batch without it); an error when it is missing."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of the model's keyword arguments, got {type(batch).__name__}")
    flag = batch.get(HARMFUL)
    ids = batch.get("input_ids")
    rows = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
    if not isinstance(flag, torch.Tensor) or flag.dim() != 1 or flag.is_floating_point() or flag.shape[0] != rows:
        got = tuple(flag.shape) if isinstance(flag, torch.Tensor) else type(flag).__name__
        raise ValueError(
            f"{method} needs batch[{HARMFUL!r}]: a [batch] bool (or 0/1 integer) tensor, true for the rows of the "
            f"harmful set, one per row of input_ids ({rows}); got {got}"
        )
    return flag.bool(), {k: v for k, v in batch.items() if k != HARMFUL}


def last_real_token(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, H]: each row's hidden state at its last real token (left or right padding)."""
    batch, length = hidden.shape[:2]
    if mask is None:
        position = torch.full((batch,), length - 1, device=hidden.device)
    else:
        # argmax finds the first maximum: the first 1 from the right is the last real token.
        position = length - 1 - mask.flip(1).long().argmax(dim=1)
    return hidden[torch.arange(batch, device=hidden.device), position]
