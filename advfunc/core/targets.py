"""Where a perturbation lives: embedding rows, embedding output, or named parameters.

A target turns a perturbation δ (a dict of tensors, the thing an attack differentiates
and updates) into what the forward pass sees: an offset added to the output of the
model's input-embedding module, or replaced parameters. It also fixes the norm groups
of δ: one L2 norm over the whole of δ (``"weight"``), one per example (``"embeds"``),
one per parameter (names), and converts δ to and from the form users see: one tensor
for the embedding targets, a ``{name: tensor}`` dict for named parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from advfunc.core.params import Params

Delta = dict[str, torch.Tensor]
PublicDelta = torch.Tensor | dict[str, torch.Tensor]
TargetSpec = Literal["weight", "embeds"] | Sequence[str]


@dataclass(frozen=True)
class Layout:
    """Per-batch index tensors a target needs; computed once per step, outside any graph.

    ``row_of``: [B, L] slot of each token's embedding row (``"weight"``).
    ``row_live``: [N, 1] 1 for a slot holding a real, non-padding-idx row, else 0.
    ``row_token``: [N] the token id in each slot, −1 for unused slots.
    ``mask``: [B, L, 1] attention mask as the embedding dtype (``"embeds"``).
    """

    shape: tuple[int, ...]
    row_of: torch.Tensor | None = None
    row_live: torch.Tensor | None = None
    row_token: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class Target(Protocol):
    """What every target implements; call sites never ask which target they hold."""

    kind: str
    reads_input_ids: bool  # the perturbation is placed by the batch's tokens

    def layout(self, batch: Mapping[str, Any]) -> Layout: ...

    def zeros(self, layout: Layout, params: Params) -> Delta: ...

    def apply(self, params: Mapping[str, torch.Tensor], layout: Layout, delta: Delta) -> tuple[Params, Any]:
        """(the parameters the forward sees, the offset [B, L, H] added to the embedding output or None)."""
        ...

    def norm_dims(self, tensor: torch.Tensor) -> tuple[int, ...] | None: ...

    def public(self, delta: Delta) -> PublicDelta: ...

    def internal(self, value: Any, layout: Layout, params: Params, what: str) -> Delta:
        """``value`` in the public form, checked against this batch, as a ``Delta``."""
        ...


class EmbeddingRows:
    """``target="weight"``: the classic perturbation of the input-embedding matrix.

    Only the rows of the batch's tokens have a gradient, so δ is held as those rows:
    ``rows`` [N, H] with N = B·L slots (unique tokens first, in increasing id order;
    unused slots zero). The forward sees ``embed(ids) + rows[row_of]``, which is ``embed``
    evaluated at the perturbed matrix. The padding_idx row gets no gradient, as in
    ``nn.Embedding``. The norm is one L2 norm over all rows: the norm of the whole matrix
    gradient.
    """

    kind = "weight"
    reads_input_ids = True

    def __init__(self, embedding: nn.Module) -> None:
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"target='weight' needs an input-embedding module with a 2-D weight, got "
                f"{type(embedding).__name__}; use target='embeds'"
            )
        self.hidden = weight.shape[1]
        self.dtype = weight.dtype
        padding_idx = getattr(embedding, "padding_idx", None)
        self.padding_idx = -1 if padding_idx is None else int(padding_idx)

    def layout(self, batch: Mapping[str, Any]) -> Layout:
        ids = batch["input_ids"]
        flat = ids.reshape(-1)
        # Sort-based dedup keeps shapes fixed (N = B·L slots) and needs no host sync,
        # unlike torch.unique: no recompilation when only the tokens change.
        sorted_ids, order = flat.sort()
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        slot_sorted = first.long().cumsum(0) - 1
        row_of = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted).view(ids.shape)
        row_token = torch.full_like(flat, -1).scatter_(0, slot_sorted, sorted_ids)
        live = (row_token >= 0) & (row_token != self.padding_idx)
        return Layout(
            shape=(flat.numel(), self.hidden),
            row_of=row_of,
            row_live=live.unsqueeze(1).to(self.dtype),
            row_token=row_token,
        )

    def zeros(self, layout: Layout, params: Params) -> Delta:
        device = next(iter(params.values())).device
        return {"rows": torch.zeros(layout.shape, dtype=self.dtype, device=device)}

    def apply(self, params: Mapping[str, torch.Tensor], layout: Layout, delta: Delta) -> tuple[Params, Any]:
        assert layout.row_live is not None and layout.row_of is not None
        return dict(params), (delta["rows"] * layout.row_live)[layout.row_of]  # [B, L, H]

    def norm_dims(self, tensor: torch.Tensor) -> tuple[int, ...] | None:
        return None

    def public(self, delta: Delta) -> PublicDelta:
        return delta["rows"]

    def internal(self, value: Any, layout: Layout, params: Params, what: str) -> Delta:
        return {"rows": _checked_tensor(value, layout.shape, what, "[B·L, H] rows of the batch's tokens")}


class EmbeddingOutput:
    """``target="embeds"``: δ [B, L, H] added to the input-embedding output, padding masked.

    Norms are per example over (seq, hidden). The embedding matrix itself is never
    read for δ, so this works when it is frozen (LoRA/PEFT) or sharded.
    """

    kind = "embeds"
    reads_input_ids = True

    def __init__(self, embedding: nn.Module) -> None:
        weight = getattr(embedding, "weight", None)
        dim = getattr(embedding, "embedding_dim", None)
        if dim is None and isinstance(weight, torch.Tensor):
            dim = weight.shape[-1]
        if dim is None:
            raise ValueError(f"cannot tell the output width of the input embedding {type(embedding).__name__}")
        self.hidden = int(dim)
        self.dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32

    def layout(self, batch: Mapping[str, Any]) -> Layout:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        return Layout(shape=(*ids.shape, self.hidden), mask=mask.unsqueeze(-1).to(self.dtype))

    def zeros(self, layout: Layout, params: Params) -> Delta:
        device = next(iter(params.values())).device
        return {"embeds": torch.zeros(layout.shape, dtype=self.dtype, device=device)}

    def apply(self, params: Mapping[str, torch.Tensor], layout: Layout, delta: Delta) -> tuple[Params, Any]:
        assert layout.mask is not None
        return dict(params), delta["embeds"] * layout.mask  # [B, L, H]

    def norm_dims(self, tensor: torch.Tensor) -> tuple[int, ...] | None:
        return tuple(range(1, tensor.dim()))

    def public(self, delta: Delta) -> PublicDelta:
        return delta["embeds"]

    def internal(self, value: Any, layout: Layout, params: Params, what: str) -> Delta:
        assert layout.mask is not None
        # Padding is never perturbed: a given δ or gradient counts only at real tokens.
        return {"embeds": _checked_tensor(value, layout.shape, what, "[batch, seq, hidden]") * layout.mask}


class NamedParameters:
    """``target=[names]``: δ is a dict of parameter-shaped tensors, θ' = θ + δ.

    Each parameter has its own L2 norm, as the classic loop over matching names has.
    """

    kind = "params"
    reads_input_ids = False

    def __init__(self, names: Sequence[str], candidates: Mapping[str, torch.Tensor]) -> None:
        names = list(names)
        if not names:
            raise ValueError("target is an empty list of parameter names; name at least one parameter")
        unknown = [n for n in names if n not in candidates]
        if unknown:
            raise ValueError(
                f"target names {unknown} are not parameters of the model; candidates: {_preview(list(candidates))}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"target names repeat: {names}")
        self.names = names

    def layout(self, batch: Mapping[str, Any]) -> Layout:
        return Layout(shape=())

    def zeros(self, layout: Layout, params: Params) -> Delta:
        return {name: torch.zeros_like(params[name]) for name in self.names}

    def apply(self, params: Mapping[str, torch.Tensor], layout: Layout, delta: Delta) -> tuple[Params, Any]:
        return {**params, **{name: params[name] + delta[name] for name in self.names}}, None

    def norm_dims(self, tensor: torch.Tensor) -> tuple[int, ...] | None:
        return None

    def public(self, delta: Delta) -> PublicDelta:
        return dict(delta)

    def internal(self, value: Any, layout: Layout, params: Params, what: str) -> Delta:
        if not isinstance(value, Mapping) or sorted(value) != sorted(self.names):
            got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise ValueError(f"{what} must be a dict with exactly the target's names {self.names}, got {got}")
        return {
            name: _checked_tensor(value[name], tuple(params[name].shape), f"{what}[{name!r}]", "parameter-shaped")
            for name in self.names
        }


def _checked_tensor(value: Any, shape: tuple[int, ...], what: str, form: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor ({form}), got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(value.shape)}, this batch needs {tuple(shape)} ({form})")
    if not value.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {value.dtype}")
    return value


TARGET_NAMES = ("weight", "embeds")


def resolve_target(model: nn.Module, spec: TargetSpec, allowed: Sequence[str] = TARGET_NAMES) -> Target:
    """Build the target ``spec`` names for ``model``; raise ``ValueError`` listing candidates.

    ``allowed`` lists the string targets a method supports; parameter names (a list) are
    allowed when ``allowed`` contains ``"weight"`` (every rule that can perturb the
    matrix can perturb any parameter).
    """
    if isinstance(spec, str):
        if spec not in allowed:
            lists = " or a list of exact parameter names" if "weight" in allowed else ""
            raise ValueError(f"unknown target {spec!r}; candidates: {list(allowed)}{lists}")
        embedding = input_embedding(model)
        if spec == "weight":
            _refuse_tied_embedding(model, embedding)
            return EmbeddingRows(embedding)
        return EmbeddingOutput(embedding)
    if isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec):
        if "weight" not in allowed:
            raise ValueError(f"this method takes target in {list(allowed)}, got parameter names {list(spec)}")
        return NamedParameters(spec, dict(model.named_parameters()))
    raise ValueError(f"target must be one of {list(allowed)} or a list of parameter names, got {spec!r}")


def input_embedding(model: nn.Module) -> nn.Module:
    """The module ``model.get_input_embeddings()`` returns, or a ``ValueError`` saying why not."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        raise ValueError(
            f"{type(model).__name__} has no get_input_embeddings(); advfunc needs a Hugging Face-style "
            "model (unwrap DDP/compile wrappers: pass model.module or model._orig_mod)"
        )
    embedding = getter()
    if not isinstance(embedding, nn.Module):
        raise ValueError(f"{type(model).__name__}.get_input_embeddings() returned {embedding!r}, not a module")
    return embedding


def _refuse_tied_embedding(model: nn.Module, embedding: nn.Module) -> None:
    # Adding δ to the embedding output perturbs the matrix where it is read as input
    # only; a tied output head would read the unperturbed matrix and break exactness.
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", object()):
        raise ValueError(
            f"{type(model).__name__} ties its input embedding to its output head, so target='weight' "
            "cannot be held as the batch's rows; use target='embeds'"
        )


def _preview(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
