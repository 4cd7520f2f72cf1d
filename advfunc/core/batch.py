"""The checks every step and attack runs on a batch before any work, in one function.

A bad batch raises naming the key, the value and the fix, instead of a raw error from
deep inside the model (a float id reaching the embedding, a label past the classifier's
classes reaching cross-entropy). Values are checked on the batch's device without a
host read (:func:`~advfunc.core.arguments.require_on_device`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from advfunc.core.arguments import require_on_device

IGNORE_INDEX = -100  # the label Hugging Face losses skip (prompt tokens, padding)
PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class BatchTypeError(TypeError, ValueError):
    """A batch value of the wrong dtype: a type error, and a bad value of the batch argument."""


@dataclass(frozen=True)
class LabelRule:
    """How a model's own loss reads ``batch['labels']``.

    ``kind``: ``"class"`` class ids (torch.long, each in [0, classes) or −100) for
    cross-entropy, a language model's token ids included; ``"regression"`` float targets
    (MSE); ``"multi_label"`` float targets [B, classes] (binary cross-entropy); ``"class
    or multi_label"`` a classifier that picks one of the two by the labels' dtype on its
    first call, as Hugging Face's do while ``config.problem_type`` is unset.
    """

    kind: Literal["class", "regression", "multi_label", "class or multi_label"]
    classes: int


def label_rule(model: nn.Module) -> LabelRule | None:
    """The rule for ``model``'s labels, read from its heads and config; None where unknown.

    A model with an output embedding (a language-model head) scores token ids over its
    rows. A classifier follows ``config.num_labels`` and ``config.problem_type``.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    output_embeddings: Any = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return LabelRule("class", weight.shape[0])
    num_labels = getattr(config, "num_labels", None)
    if not isinstance(num_labels, int) or num_labels < 1:
        return None
    problem = getattr(config, "problem_type", None)
    if problem == "regression" or (problem is None and num_labels == 1):
        return LabelRule("regression", num_labels)
    if problem == "multi_label_classification":
        return LabelRule("multi_label", num_labels)
    if problem == "single_label_classification":
        return LabelRule("class", num_labels)
    return LabelRule("class or multi_label", num_labels)


@dataclass(frozen=True)
class BatchSpec:
    """What a model takes: its forward's keywords, its vocabulary, how its loss reads labels.

    ``labels`` is None where a ``loss_fn`` reads the batch (it may mean anything) or the
    model's loss is unknown; ``own_loss`` whether the model's ``outputs.loss`` is the loss.
    """

    model_name: str
    accepted: frozenset[str]
    vocabulary: int | None
    own_loss: bool
    labels: LabelRule | None


def check_batch(
    spec: BatchSpec, batch: Any, device: torch.device, needs_ids: bool = True, needs_loss: bool = True
) -> dict[str, Any]:
    """Raise naming the key and the fix unless ``batch`` is one the model can score; return it as a dict.

    Checked: a mapping of the forward's keywords; ``input_ids`` ([batch, seq] integer ids
    in the vocabulary) whenever present, and required with ``needs_ids`` (a perturbation
    of the embedding output needs them); one ``[batch, seq]`` shape for the per-token
    keys, at least one example of one token; every tensor on ``device``; labels present
    when ``needs_loss`` and the model's loss is the loss, one per example, of the dtype
    and range that loss reads (:class:`LabelRule`). A batch whose labels are all −100 is
    valid: there is nothing to score, and the step reports it as skipped.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of the model's keyword arguments, got {type(batch).__name__}")
    unknown = sorted(k for k in batch if k not in spec.accepted)
    if unknown:
        raise TypeError(
            f"batch keys {unknown} are not arguments of {spec.model_name}.forward; it takes {sorted(spec.accepted)}"
        )
    if needs_ids and batch.get("inputs_embeds") is not None:
        raise ValueError(
            "batch has 'inputs_embeds': the model would skip its input embedding, where advfunc "
            "adds the perturbation; pass 'input_ids' instead"
        )
    ids = batch.get("input_ids")
    if needs_ids or ids is not None:
        _check_ids(ids, spec.vocabulary)
    check_devices(batch, device)
    examples = _check_shapes({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    labels = batch.get("labels")
    if needs_loss and spec.own_loss and labels is None:
        raise ValueError(
            "batch has no 'labels', so the model returns no loss; add labels or give the factory "
            "loss_fn(outputs, batch)"
        )
    if labels is not None and spec.own_loss:
        _check_labels(labels, spec.labels, examples)
    return dict(batch)


def check_devices(batch: Mapping[str, Any], device: torch.device) -> None:
    """Raise naming the key unless every tensor in ``batch`` is on ``device``."""
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            raise ValueError(f"batch[{key!r}] is on {value.device}, the model on {device}; move the batch there")


def _check_ids(ids: Any, vocabulary: int | None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(
            f"batch['input_ids'] must be a [batch, seq] integer tensor, got "
            f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else tuple(ids.shape)}"
        )
    if ids.dtype not in (torch.long, torch.int32):  # the dtypes an embedding lookup takes
        raise BatchTypeError(
            f"batch['input_ids'] must be integer token ids of dtype torch.long or torch.int32, got {ids.dtype}; "
            "tokenize with the model's tokenizer, or convert with input_ids.long()"
        )
    if vocabulary is not None and ids.numel():
        require_on_device(
            (ids.min() >= 0) & (ids.max() < vocabulary),
            lambda: ValueError(
                f"batch['input_ids'] holds ids in [{int(ids.min())}, {int(ids.max())}] but the "
                f"vocabulary has {vocabulary} rows; tokenize with the model's tokenizer"
            ),
        )


def _check_shapes(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The number of examples the per-token keys agree on; None without per-token keys."""
    shaped = {k: tuple(tensors[k].shape) for k in PER_TOKEN if k in tensors}
    if not shaped:
        return None
    first, shape = next(iter(shaped.items()))
    if len(shape) != 2 or 0 in shape:
        raise ValueError(
            f"batch[{first!r}] has shape {shape}; it must be [batch, seq] with at least one example and one token"
        )
    for key, other in shaped.items():
        if other != shape:
            raise ValueError(
                f"batch[{key!r}] has shape {other}, batch[{first!r}] {shape}; every per-token key must match"
            )
    return shape[0]


def _check_labels(labels: Any, rule: LabelRule | None, examples: int | None) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"batch['labels'] must be a tensor, got {type(labels).__name__}")
    if examples is not None and (labels.dim() == 0 or labels.shape[0] != examples):
        raise ValueError(f"batch['labels'] has shape {tuple(labels.shape)}, but the batch has {examples} examples")
    if rule is None:
        return
    floating = labels.dtype.is_floating_point
    multi_label = rule.kind == "multi_label" or (
        rule.kind == "class or multi_label" and floating and labels.shape[1:] == (rule.classes,)
    )
    if rule.kind == "regression" or multi_label:
        wanted = "float targets" if rule.kind == "regression" else f"float targets of shape [batch, {rule.classes}]"
        if not floating:
            raise BatchTypeError(f"batch['labels'] must be {wanted} for this model's loss, got {labels.dtype}")
        if multi_label and labels.shape[1:] != (rule.classes,):
            raise ValueError(f"batch['labels'] must be {wanted}, got shape {tuple(labels.shape)}")
        require_on_device(
            torch.isfinite(labels).all(),
            lambda: ValueError("batch['labels'] holds NaN or infinite targets; drop or fix those examples"),
        )
        return
    if labels.dtype != torch.long:
        also = f", or float targets of shape [batch, {rule.classes}]" if rule.kind == "class or multi_label" else ""
        raise BatchTypeError(
            f"batch['labels'] must be class ids of dtype torch.long (labels.long()){also}, got {labels.dtype}"
        )
    if labels.numel():
        valid = ((labels >= 0) & (labels < rule.classes)) | (labels == IGNORE_INDEX)
        require_on_device(
            valid.all(),
            lambda: ValueError(
                f"batch['labels'] holds {sorted(set(labels[~valid].tolist()))[:5]}, but the model has "
                f"{rule.classes} classes: each label must be in [0, {rule.classes}) or {IGNORE_INDEX} (ignored)"
            ),
        )


def nothing_scored(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """[] bool: every label is −100, so the loss has no term (a mean over none: NaN); None without class labels."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or not labels.numel():
        return None
    return (labels == IGNORE_INDEX).all()
