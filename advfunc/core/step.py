"""The step contract shared by every method: ``step(params, batch) -> (grads, out)``.

Also the prepared call every step and attack starts from: the caller's params and batch
checked once, completed with the model's own tensors, and the target's layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from advfunc.core.batch import check_devices, nothing_scored
from advfunc.core.model import OffsetCalls, PerturbedModel
from advfunc.core.params import Params, params_of, trainable_names
from advfunc.core.targets import PERTURB_MASK, Delta, Layout, PublicDelta, Target


class StepOutput(NamedTuple):
    """What a step reports beside its grads; every tensor is detached.

    loss: [] clean loss (FreeLB: the mean of its K perturbed losses).
    adv_loss: [] the last perturbed loss.
    delta: the final perturbation: [N, H] embedding rows (``"weight"``; the token of each
        row in ``delta_tokens``), [B, L, H] (``"embeds"``) or {name: tensor} (names).
    skipped: [] bool: skip the optimizer update. A non-finite target gradient made the step
        drop its perturbation, or the step's grads or losses are not finite (lower the
        method's radii), or every label is −100: nothing to score, ``loss`` and
        ``adv_loss`` are then 0 (a batch whose completions were all truncated away).
    logits: the clean pass's logits, [B, C], when the model returns them.
    delta_tokens: [N] token id of each row of ``delta`` for ``"weight"``, −1 for unused rows.
    """

    loss: torch.Tensor
    adv_loss: torch.Tensor
    delta: PublicDelta
    skipped: torch.Tensor
    logits: torch.Tensor | None = None
    delta_tokens: torch.Tensor | None = None


Grads = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Step:
    """A method bound to a model: call it as ``grads, out = step(params, batch)``.

    ``passes`` is the cost in forward+backward passes (a pass that only differentiates
    the perturbation counts as one), ``config`` the hyper-parameters it was built with.
    A method with state between calls (SMART, free AT) is a
    :class:`~advfunc.core.stateful.StatefulStep`.
    """

    method: str
    passes: int
    config: Mapping[str, Any]
    fn: Callable[..., tuple[Grads, StepOutput]] = field(repr=False)

    def __call__(
        self, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *args: Any, **kwargs: Any
    ) -> tuple[Grads, StepOutput]:
        grads, out = self.fn(params, batch, *args, **kwargs)
        # Finite inputs can still overflow (a radius of 1e30): such grads are reported, never passed off as good.
        skipped = out.skipped | ~all_finite(grads) | ~torch.isfinite(out.loss) | ~torch.isfinite(out.adv_loss)
        empty = nothing_scored(batch)
        if empty is None:
            return grads, out._replace(skipped=skipped)
        # Labels all −100 leave the loss a mean over no terms: reported as 0, and the update skipped.
        zero = torch.zeros_like(out.loss)
        return grads, out._replace(
            loss=torch.where(empty, zero, out.loss),
            adv_loss=torch.where(empty, zero, out.adv_loss),
            skipped=skipped | empty,
        )


def all_finite(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[] bool: every entry of every tensor in ``grads`` is finite. No host sync.

    min and max propagate NaN and reach ±inf when any entry does, so one ``aminmax`` pass
    per tensor decides it without ``isfinite``'s full-size temporaries (a vocabulary-sized
    gradient would cost a second vocabulary-sized allocation every step); on a 2-core CPU
    it reads a small BERT's 13M gradients in 9 ms, separate ``amax`` and ``amin`` in 16 ms.
    """
    if not grads:
        raise ValueError("grads is empty: there is nothing to check; pass the grads a step returned")
    extremes = [e for g in grads.values() if g.numel() for e in torch.aminmax(g)]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=next(iter(grads.values())).device)
    return torch.isfinite(torch.stack(extremes).float()).all()


@dataclass(frozen=True)
class Call:
    """A validated call: full params, trainable names, model kwargs, the target layout, the loss scale."""

    params: Params
    trainable: list[str]
    kwargs: dict[str, Any]
    layout: Layout
    device: torch.device
    scale: torch.Tensor  # [] float32: grads come back multiplied by it

    def zeros(self, target: Target) -> Delta:
        """δ = 0 in ``target``'s shape."""
        return target.zeros(self.layout, self.params)


def prepare(
    model: nn.Module,
    perturbed: PerturbedModel,
    target: Target,
    params: Mapping[str, torch.Tensor],
    batch: Any,
    loss_scale: float | torch.Tensor = 1.0,
    needs_loss: bool = True,
) -> Call:
    """Check ``params`` and ``batch`` and fill in the model's own tensors for missing names.

    ``needs_loss=False`` admits a batch without labels (VAT on unlabelled text). Batch
    keys the target consumes (``perturb_mask``) shape the layout and never reach the model.
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a mapping name -> tensor (advfunc.params_of(model)), got {type(params).__name__}"
        )
    own = params_of(model)
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise ValueError(f"params has names the model does not: {unknown[:5]}; build it with advfunc.params_of(model)")
    for name, value in params.items():
        if not isinstance(value, torch.Tensor) or value.shape != own[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"params[{name!r}] is {shape}, the model's parameter has shape {tuple(own[name].shape)}")
        if value.dtype != own[name].dtype or value.device != own[name].device:
            raise ValueError(
                f"params[{name!r}] is {value.dtype} on {value.device}, the model's parameter {own[name].dtype} on "
                f"{own[name].device}; move the model (model.to(...)) and take advfunc.params_of(model) again"
            )
    full = {**own, **params}
    trainable = trainable_names(model)
    if not trainable:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    consumed = {k: batch[k] for k in target.batch_keys if isinstance(batch, Mapping) and k in batch}
    if consumed:
        batch = {k: v for k, v in batch.items() if k not in consumed}
    elif isinstance(batch, Mapping) and PERTURB_MASK in batch:
        raise ValueError(
            f"batch[{PERTURB_MASK!r}] restricts a per-token perturbation, but target {target.kind!r} has no "
            "token positions; use target='embeds' or a module name"
        )
    device = next(iter(full.values())).device
    kwargs = perturbed.check_batch(batch, needs_ids=target.reads_input_ids, needs_loss=needs_loss, device=device)
    check_devices(consumed, device)
    layout = target.layout({**kwargs, **consumed})
    return Call(full, trainable, kwargs, layout, device, as_scale(loss_scale, device))


def drop_if_skipped(delta: Delta, skipped: torch.Tensor) -> Delta:
    """δ, or 0 when ``skipped``: a non-finite gradient never becomes the perturbation."""
    return {k: torch.where(skipped, torch.zeros_like(v), v) for k, v in delta.items()}


def check_hook_fired(counter: OffsetCalls | None, target: Target) -> None:
    """Raise when the model never ran its input embedding: the perturbation would be a no-op.

    ``counter`` is None where nothing is counted (compiled steps); a parameter target
    needs no hook.
    """
    if counter is not None and target.reads_input_ids and counter.calls == 0:
        raise ValueError(
            "the model never called its input-embedding module, so the perturbation had no effect; "
            "does the batch bypass it?"
        )


def report(
    target: Target,
    layout: Layout,
    delta: Delta,
    loss: torch.Tensor,
    adv_loss: torch.Tensor,
    skipped: torch.Tensor,
    logits: torch.Tensor | None,
) -> StepOutput:
    """The ``StepOutput`` for a final ``delta``, in the target's public form."""
    public = target.public({k: v.detach() for k, v in delta.items()})
    return StepOutput(
        loss=loss.detach(),
        adv_loss=adv_loss.detach(),
        delta=public,
        skipped=skipped.detach(),
        logits=None if logits is None else logits.detach(),
        delta_tokens=layout.row_token,
    )


def as_scale(loss_scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A step's ``loss_scale`` as a 0-dim float32 tensor; grads are returned multiplied by it.

    Mixed-precision users pass their scaler's current scale and unscale the grads; a
    tensor keeps a compiled step from recompiling when the scale changes.
    """
    if isinstance(loss_scale, torch.Tensor):
        if loss_scale.numel() != 1:
            raise ValueError(f"loss_scale must be a scalar, got a tensor of shape {tuple(loss_scale.shape)}")
        return loss_scale.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not 0 < loss_scale < math.inf:
        raise ValueError(f"loss_scale must be a finite number > 0 (1.0 without mixed precision), got {loss_scale!r}")
    # A fill on the device: torch.tensor(value, device=cuda) copies from the host and waits for the stream.
    return torch.full((), float(loss_scale), dtype=torch.float32, device=device)
