"""FSDP2 (``torch.distributed.fsdp.fully_shard``): a functional step on a sharded model.

A step substitutes whole parameters through ``functional_call``. FSDP2 holds each
parameter as a ``DTensor`` shard and, in its pre-forward hooks, gathers the shards and
puts the gathered parameters back into the modules, over the step's substitutes (the
step's parameter gradients would be zero). Inside :func:`unsharded` every FSDP2 module
is gathered once and kept gathered (no reshard after forward or backward), so its hooks
find nothing to do and the step differentiates its own leaves, exactly as on one
process. :func:`shard_grads` then hands each rank's part of the averaged gradient to the
sharded parameters' ``.grad``, where the optimizer (built on the sharded parameters)
reads it.

Memory: during the step every rank holds every parameter whole, as under DDP; the
gradients handed to the optimizer and its state stay sharded. The gradient average is
one all-reduce of the whole gradient (:func:`advfunc.distributed.all_reduce_grads`).

Example (each rank its own batch)::

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters())
    with advfunc.scale.fsdp.unsharded(model):
        step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=3, target="embeds")
        grads, out = step(advfunc.params_of(model), batch)
    grads = advfunc.distributed.all_reduce_grads(grads)
    advfunc.scale.fsdp.shard_grads(model, grads)
    optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The modules ``fully_shard`` was applied to, root first."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or any of its submodules."""
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Gather every FSDP2 module's parameters for the length of the block, then shard them again.

    Steps built and called inside see whole parameters; one built inside and called
    outside is refused (its parameters are sharded again). Each module's
    ``reshard_after_forward`` / ``reshard_after_backward`` is off inside the block and as
    it was before after it. Raises ``ValueError`` when ``model`` has no FSDP2 module.
    """
    modules = fsdp_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no fully_shard module; call the step without unsharded()")
    settings = [_reshard_settings(module) for module in modules]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.set_reshard_after_backward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        for module, setting in zip(modules, settings, strict=True):
            module.reshard()
            _restore_reshard_settings(module, setting)


# FSDP2 has setters for its reshard flags but no getters: the state they set is read and
# put back as it was (the root's automatic "no reshard after forward" included).
_ReshardSettings = tuple[bool | None, list[tuple[Any, bool]]]


def _reshard_settings(module: FSDPModule) -> _ReshardSettings:
    state = module._get_fsdp_state()
    groups = [(g.post_forward_mesh_info, g.reshard_after_backward) for g in state._fsdp_param_groups]
    return state._auto_reshard_after_forward, groups


def _restore_reshard_settings(module: FSDPModule, settings: _ReshardSettings) -> None:
    state = module._get_fsdp_state()
    state._auto_reshard_after_forward, groups = settings
    for group, (post_forward, after_backward) in zip(state._fsdp_param_groups, groups, strict=True):
        group.post_forward_mesh_info, group.reshard_after_backward = post_forward, after_backward


def shard_grads(model: nn.Module, grads: Mapping[str, torch.Tensor]) -> None:
    """Write this rank's shard of each whole gradient in ``grads`` to the sharded parameter's ``.grad``.

    ``grads`` must be the same on every rank (the all-reduced average): each rank keeps
    its own shard without communication. Call it outside :func:`unsharded`; a name in
    ``grads`` the model lacks, or a shape that is not the parameter's, is a ``ValueError``.
    """
    parameters = dict(model.named_parameters())
    for name, grad in grads.items():
        param = parameters.get(name)
        if param is None:
            raise ValueError(f"grads has {name!r}, which the model lacks; pass the grads its step returned")
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(f"grads[{name!r}] has shape {tuple(grad.shape)}, the parameter {tuple(param.shape)}")
        if isinstance(param, DTensor):
            grad = distribute_tensor(grad.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.grad = grad
