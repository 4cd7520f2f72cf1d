"""Data-parallel training across processes: one bucketed gradient all-reduce per optimizer step.

An advfunc step never communicates: its inner ascent passes, its clean and perturbed
passes all run on the local shard of the batch and return plain local grads. Data
parallelism is then one collective per optimizer step, after the step (and after
:func:`advfunc.accumulate` over micro-batches, when accumulating)::

    model = advfunc.distributed.unwrap(ddp_or_accelerate_model)   # the step needs the bare module
    advfunc.distributed.broadcast_parameters(model)               # once, before training
    step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=3)
    for batch in loader:                                          # each rank: its own shard
        grads, out = step(advfunc.params_of(model), batch)
        grads = advfunc.distributed.all_reduce_grads(grads)      # mean over ranks, few calls
        advfunc.set_grads(model, grads)
        optimizer.step()

:func:`all_reduce_grads` flattens the grads into buckets of at most ``bucket_mb``
MiB (one per dtype and device at least) and issues one ``all_reduce`` per bucket,
as DDP's reducer does, instead of one per tensor: MiniLM's 91 MB of fp32 grads in
105 tensors take 3 calls at the default 25 MiB, BERT-base's 440 MB in 201 tensors 16.
DDP's own reducer never fires for an advfunc step: it hooks the model's parameters,
and the step differentiates fresh leaves of its own.

Sharded parameters (FSDP, FSDP2 ``fully_shard``, DeepSpeed ZeRO-3, tensor-parallel
``DTensor``) are refused by :func:`refuse_sharded`: their pre-forward hooks swap in
the gathered parameters behind ``functional_call``'s back, so the step's parameter
gradients would silently be zero (measured with FSDP2 on CPU/gloo, torch 2.13).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from advfunc.core.params import Params
from advfunc.core.sharding import refuse_sharded

# DDP's default bucket cap (``bucket_cap_mb=25``): large enough that per-call latency
# is amortised, small enough that the flat copy stays a small fraction of memory.
DEFAULT_BUCKET_MB = 25.0
_MB = 1024 * 1024


class Bucket(NamedTuple):
    """Tensors flattened into one buffer and reduced by one collective call.

    names: the tensors' names, in the order they are laid out in the buffer.
    dtype, device: shared by every tensor of the bucket (a buffer has one of each).
    numel: total number of elements, Σ numel over ``names``.
    """

    names: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device
    numel: int


def plan_buckets(tensors: Mapping[str, torch.Tensor], bucket_mb: float = DEFAULT_BUCKET_MB) -> list[Bucket]:
    """Group ``tensors`` into buckets of at most ``bucket_mb`` MiB each, by dtype and device.

    Tensors keep the mapping's order inside each (dtype, device) group; a bucket is
    closed when the next tensor would take it past the cap, and a tensor larger than
    the cap is a bucket of its own. The plan depends only on names, shapes, dtypes and
    order, so every rank that holds the same model computes the same plan and issues
    the same sequence of collectives (a mismatch would deadlock).

    Cost: O(number of tensors), no copy.
    """
    cap = _bucket_bytes(bucket_mb)
    open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[str], int]] = {}
    closed: list[Bucket] = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] is {type(tensor).__name__}, not a tensor")
        key = (tensor.dtype, tensor.device)
        names, numel = open_buckets.get(key, ([], 0))
        size = tensor.numel() * tensor.element_size()
        if names and (numel * tensor.element_size() + size) > cap:
            closed.append(Bucket(tuple(names), key[0], key[1], numel))
            names, numel = [], 0
        open_buckets[key] = ([*names, name], numel + tensor.numel())
    closed.extend(Bucket(tuple(names), key[0], key[1], numel) for key, (names, numel) in open_buckets.items() if names)
    return closed


def all_reduce_grads(
    grads: Mapping[str, torch.Tensor],
    *,
    average: bool = True,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    group: dist.ProcessGroup | None = None,
) -> Params:
    """Σ_r grads_r / R over the R ranks of ``group`` (``average=False``: the plain sum).

    .. math::
        \\bar g = \\frac1R \\sum_{r=1}^{R} g_r

    With every rank's loss a mean over an equal-sized local batch, ḡ is the gradient
    of the mean loss over the global batch. Call it once per optimizer step, on the
    grads a step (or :func:`advfunc.accumulate`) returned, in the same order of keys
    on every rank (a step returns them in ``named_parameters`` order).

    Each bucket of :func:`plan_buckets` is copied into one flat buffer, divided by R
    (before the sum, as DDP does, so fp16 grads that fit do not overflow in the sum)
    and all-reduced asynchronously; the calls are awaited together. Returns new
    tensors (views into the bucket buffers) of the same names, shapes and dtypes; the
    input is untouched. A non-finite grad on any rank makes the result non-finite on
    every rank, so an overflow check after this call (:func:`advfunc.precision.unscale_and_check`)
    reaches the same decision everywhere without another collective.

    Cost: one ``all_reduce`` per bucket (⌈bytes / bucket_mb⌉ or a few more), one copy
    of the grads. With a single process it returns ``grads`` as they are.
    """
    _require_initialized("all_reduce_grads")
    plan = plan_buckets(grads, bucket_mb)
    world = dist.get_world_size(group)
    if world == 1:
        return dict(grads)
    flats = []
    works = []
    for bucket in plan:
        flat = torch.cat([grads[name].reshape(-1) for name in bucket.names])  # a copy: the input stays as it was
        if average:
            flat.div_(world)
        works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True))
        flats.append(flat)
    for work in works:
        if work is not None:
            work.wait()
    return _unflatten(plan, flats, grads)


def broadcast_parameters(
    model: nn.Module,
    src: int = 0,
    *,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``model``, in place.

    Call once before training (DDP's constructor does the same): a freshly added
    classification head is initialised differently on each rank unless every rank
    seeds alike, and replicas that start apart stay apart. Like ``optimizer.step()``,
    and unlike every advfunc step, this writes into the model's tensors.

    Cost: one ``broadcast`` per bucket of parameters and buffers.
    """
    _require_initialized("broadcast_parameters")
    if not isinstance(model, nn.Module):
        raise TypeError(f"broadcast_parameters needs an nn.Module, got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {f"param:{n}": p for n, p in model.named_parameters()}
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    if dist.get_world_size(group) == 1 or not tensors:
        return
    plan = plan_buckets(tensors, bucket_mb)
    with torch.no_grad():
        for bucket in plan:
            flat = torch.cat([tensors[name].detach().reshape(-1) for name in bucket.names])
            dist.broadcast(flat, src=src, group=group)
            for name, value in _unflatten([bucket], [flat], tensors).items():
                tensors[name].copy_(value)


def replicas_agree(
    params: Mapping[str, torch.Tensor], *, group: dist.ProcessGroup | None = None, rtol: float = 0.0
) -> bool:
    """Whether every rank holds the same ``params`` (to ``rtol`` of their fingerprints).

    Each tensor's fingerprint is (Σx, Σx², Σ i·x) in float64; one ``all_reduce(MAX)`` of
    [f, −f] gives the largest and smallest fingerprint over ranks. Identical tensors
    give identical fingerprints, so ``rtol=0`` checks exact agreement. A cheap check
    for tests and for a periodic assertion in long runs; it syncs with the host.
    """
    _require_initialized("replicas_agree")
    if not params:
        return True
    prints = []
    for value in params.values():
        flat = value.detach().reshape(-1).double()
        ramp = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) / max(flat.numel(), 1)
        prints.append(torch.stack([flat.sum(), flat.pow(2).sum(), (ramp * flat).sum()]))
    fingerprint = torch.cat(prints)
    both = torch.cat([fingerprint, -fingerprint])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    highest, lowest = both[: fingerprint.numel()], -both[fingerprint.numel() :]
    return bool(torch.all(highest - lowest <= rtol * torch.maximum(highest.abs(), lowest.abs())))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP, ``nn.DataParallel``, ``torch.compile`` or DeepSpeed wrappers.

    A step must be built on the module that owns ``get_input_embeddings()`` and whose
    ``named_parameters()`` carry no ``module.`` prefix: ``advfunc.pgd(unwrap(model))``.
    The wrapper stays useful around it (DDP broadcast the weights at construction;
    accelerate keeps its autocast forward on the module, which the step then runs).
    Raises ``TypeError`` for sharded models (see :func:`refuse_sharded`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unwrap needs an nn.Module, got {type(model).__name__}")
    seen = 0
    while seen < 16:  # wrappers nest a few deep at most; the bound guards a self-referencing .module
        seen += 1
        inner = _wrapped(model)
        if inner is None:
            break
        model = inner
    refuse_sharded(model)
    return model


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module one wrapper layer down, or None when ``model`` is not a known wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    if type(model).__name__ == "OptimizedModule":  # torch.compile; importing torch._dynamo to check costs ~1 s
        inner = getattr(model, "_orig_mod", None)
        return inner if isinstance(inner, nn.Module) else None
    if type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine"):
        inner = getattr(model, "module", None)
        return inner if isinstance(inner, nn.Module) else None
    return None


def _unflatten(plan: list[Bucket], flats: list[torch.Tensor], like: Mapping[str, torch.Tensor]) -> Params:
    """{name: view of its slice of the bucket buffer, shaped like ``like[name]``}, in ``like``'s order.

    Only the names of ``plan`` appear (a plan may cover part of ``like``).
    """
    pieces: Params = {}
    for bucket, flat in zip(plan, flats, strict=True):
        offset = 0
        for name in bucket.names:
            n = like[name].numel()
            pieces[name] = flat[offset : offset + n].view(like[name].shape)
            offset += n
    return {name: pieces[name] for name in like if name in pieces}


def _bucket_bytes(bucket_mb: float) -> float:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)):
        raise TypeError(f"bucket_mb must be a number of MiB, got {bucket_mb!r}")
    if not math.isfinite(bucket_mb) or bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be a finite number of MiB > 0 (DDP uses 25), got {bucket_mb!r}")
    return bucket_mb * _MB


def _require_initialized(caller: str) -> None:
    if not dist.is_available():
        raise RuntimeError(f"{caller}: this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{caller}: no process group; launch with torchrun and call "
            "torch.distributed.init_process_group('nccl' on GPU, 'gloo' on CPU) first"
        )
