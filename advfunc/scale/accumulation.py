"""Gradient accumulation over micro-batches, each attacked with its own gradient.

The imperative recipe (a backward per micro-batch accumulating into ``.grad``) aims each
micro-batch's attack with ``.grad`` as it stands, which already holds the sum of the
earlier micro-batches' gradients; FGM/PGD on ``target="weight"`` then perturb in the
wrong direction from the second micro-batch on. An advfunc step is a pure function of
one micro-batch, so here every attack sees only its own clean gradient, and the only
thing carried across micro-batches is the running sum of the returned grads::

    grads, acc = advfunc.accumulate(step, params, advfunc.split_batch(batch, 4), reduction="mean")

Under data parallelism the accumulated grads are all-reduced once, after the last
micro-batch: there is no ``no_sync()`` to remember.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import torch

from advfunc.core.params import Params
from advfunc.core.step import StepOutput

Reduction = Literal["sum", "mean"]


class Accumulated(NamedTuple):
    """What :func:`accumulate` reports beside its grads; every tensor is detached.

    loss: [] mean of the micro-batches' clean losses (the global-batch loss for equal sizes).
    adv_loss: [] mean of their last perturbed losses.
    skipped: [] bool: some micro-batch dropped its perturbation (a non-finite target gradient).
    outs: each micro-batch's own ``StepOutput``, in order (δ shapes differ between them).
    """

    loss: torch.Tensor
    adv_loss: torch.Tensor
    skipped: torch.Tensor
    outs: tuple[StepOutput, ...]


def accumulate(
    step: Callable[..., tuple[Params, StepOutput]],
    params: Mapping[str, torch.Tensor],
    micro_batches: Iterable[Mapping[str, Any]],
    *,
    reduction: Reduction = "sum",
    loss_scale: float | torch.Tensor = 1.0,
    **step_kwargs: Any,
) -> tuple[Params, Accumulated]:
    """Run ``step`` on each micro-batch at the same ``params`` and combine the grads.

    .. math::
        \\text{grads} = c \\sum_{m=1}^{M} \\text{step}(θ, b_m).\\text{grads},\\qquad
        c = 1 \\;(\\text{"sum"}) \\text{ or } 1/M \\;(\\text{"mean"})

    Each term is a whole step (clean pass, attack aimed with ∇ of b_m alone, perturbed
    pass), so ``"sum"`` equals the sum of M single-micro-batch steps exactly, and
    ``"mean"`` equals, for equal-sized micro-batches and a mean-reduced loss, the
    gradient of the global-batch loss with per-micro-batch attacks (the same grads as
    M data-parallel ranks after :func:`advfunc.distributed.all_reduce_grads`).
    ``"sum"`` (the default) matches what ``backward()`` per micro-batch leaves in
    ``.grad``; divide the learning rate by M, or ask for ``"mean"``, to keep a
    full-batch learning rate.

    ``loss_scale`` and ``step_kwargs`` (e.g. ``generator=``, ``teacher=``) go to every
    call. Methods that carry a perturbation from one call to the next (``free_at``'s
    ``delta``) need their own loop. Memory: one set of grads beyond the step's own.
    Cost: M steps; no communication.
    """
    if not callable(step):
        raise TypeError(f"step must be an advfunc step (e.g. advfunc.pgd(model)), got {type(step).__name__}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if isinstance(micro_batches, Mapping):
        raise TypeError(
            "micro_batches is a single batch (a mapping); pass a list of batches, e.g. advfunc.split_batch(batch, 4)"
        )
    total: Params = {}
    outs: list[StepOutput] = []
    for index, micro in enumerate(micro_batches):
        grads, out = step(params, micro, loss_scale=loss_scale, **step_kwargs)
        if index == 0:
            total = dict(grads)
        elif index == 1:
            # a new buffer: the first step's grads are never written into, whoever else holds them
            total = {name: total[name] + grads[name] for name in total}
        else:
            total = {name: total[name].add_(grads[name]) for name in total}
        outs.append(out)
    if not outs:
        raise ValueError("micro_batches is empty; pass at least one batch")
    if reduction == "mean" and len(outs) > 1:
        total = {name: g.div_(len(outs)) for name, g in total.items()}
    summary = Accumulated(
        loss=torch.stack([o.loss.float() for o in outs]).mean(),
        adv_loss=torch.stack([o.adv_loss.float() for o in outs]).mean(),
        skipped=torch.stack([o.skipped for o in outs]).any(),
        outs=tuple(outs),
    )
    return total, summary


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """``batch`` cut into ``parts`` micro-batches along dim 0 (sizes differ by at most one).

    Every tensor with a leading batch dimension is split (views, no copy); other values
    (flags, 0-dim tensors) are shared by all parts. For a data-parallel shard by hand,
    ``split_batch(batch, world_size)[rank]`` (a ``DistributedSampler`` does it for a loader).
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of the model's keyword arguments, got {type(batch).__name__}")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an int >= 1, got {parts!r}")
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes:
        raise ValueError("batch has no tensor with a batch dimension to split")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sizes}; they must share dim 0")
    size = next(iter(sizes.values()))
    if parts > size:
        raise ValueError(f"cannot split a batch of {size} into {parts} parts; use parts <= {size}")
    pieces = {k: torch.tensor_split(batch[k], parts) for k in sizes}
    return [{k: (pieces[k][i] if k in pieces else v) for k, v in batch.items()} for i in range(parts)]
