"""Refusal of sharded models: FSDP, ZeRO-3 and tensor parallelism bypass ``functional_call``."""

from __future__ import annotations

from torch import nn

# FSDP (v1). FSDP2 (``fully_shard``) is refused by its DTensor parameters: gathered for a
# step (advfunc.scale.fsdp.unsharded) they are whole, and its hooks leave them in place.
_FSDP_CLASSES = frozenset({"FullyShardedDataParallel"})
_SHARDED_PARAMETERS = frozenset({"DTensor", "FlatParameter"})


def refuse_sharded(model: nn.Module) -> None:
    """Raise ``TypeError`` when ``model``'s parameters are sharded across ranks.

    FSDP (``FullyShardedDataParallel``, FSDP2 ``fully_shard`` while its parameters are
    sharded), DeepSpeed ZeRO-3 and tensor parallelism hold each parameter in pieces and
    gather it in forward hooks, which replace the tensors ``functional_call`` substitutes:
    the step would run, and return zero parameter gradients. Checked when a step is built
    and at every call. Replicated-parameter schemes work: DDP, and
    ZeRO-1/2-style optimizer-state sharding (``ZeroRedundancyOptimizer``) over the
    grads :func:`all_reduce_grads` returns.
    """
    why = _sharding(model)
    if why is not None:
        raise TypeError(
            f"{type(model).__name__} has sharded parameters ({why}); advfunc's functional steps need every "
            "rank to hold whole parameters. With FSDP2 (fully_shard), build and call the step inside "
            "advfunc.scale.fsdp.unsharded(model); otherwise use DDP (or ZeRO-1/2 optimizer sharding) with "
            "advfunc.distributed.all_reduce_grads; see docs/scale_and_precision.md (FSDP/ZeRO-3)"
        )


def _sharding(model: nn.Module) -> str | None:
    """A short description of how ``model`` is sharded, or None when every parameter is whole.

    Checked by class name along the MRO: importing ``torch.distributed.fsdp`` to test
    ``isinstance`` would cost a large import on every factory call.
    """
    for name, module in model.named_modules():
        wrapper = next((c.__name__ for c in type(module).__mro__ if c.__name__ in _FSDP_CLASSES), None)
        if wrapper is not None:
            return f"{wrapper} at {name or 'the root'}"
    for name, param in model.named_parameters():
        if type(param).__name__ in _SHARDED_PARAMETERS:
            return f"{name} is a {type(param).__name__}"
        if hasattr(param, "ds_id"):  # set by DeepSpeed's zero.Init, stage 3 only
            return f"{name} is a DeepSpeed ZeRO-3 partitioned parameter"
    return None
