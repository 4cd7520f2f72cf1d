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

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The modules ``fully_shard`` was applied to, root first."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Gather every FSDP2 module's parameters for the length of the block, then shard them again.

    Steps built and called inside see whole parameters; one built inside and called
    outside is refused (its parameters are sharded again). Raises ``ValueError`` when
    ``model`` has no FSDP2 module.
    """
    modules = fsdp_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no fully_shard module; call the step without unsharded()")
    for module in modules:
        module.set_reshard_after_forward(False)
        module.set_reshard_after_backward(False)
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True)
            module.set_reshard_after_backward(True)


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
