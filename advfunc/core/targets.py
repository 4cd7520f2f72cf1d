"""Where a perturbation lives: embedding rows, embedding output, a module's output, or named parameters.

A target turns a perturbation δ (a dict of tensors, the thing an attack differentiates
and updates) into what the forward pass sees: an offset added to the output of the
model's input-embedding module or of named submodules (the residual stream of a
decoder layer), or replaced parameters. It also fixes the norm groups of δ: one L2
norm over the whole of δ (``"weight"``), one per example (``"embeds"``, modules), one
per parameter (names), and converts δ to and from the form users see: one tensor for
the embedding targets and a single module, a ``{name: tensor}`` dict for several
modules and for named parameters.

Token positions: a per-token target perturbs the real (non-padding) tokens; the
``"@prompt"`` suffix (``"embeds@prompt"``, ``"model.layers.4@prompt"``) restricts it to
the prompt, the positions whose label is −100; and a batch may carry a ``[B, L]`` mask
under :data:`PERTURB_MASK`, which restricts it further. advfunc consumes that key and
never passes it to the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from advfunc.core.arguments import require_on_device
from advfunc.core.params import Params

Delta = dict[str, torch.Tensor]
PublicDelta = torch.Tensor | dict[str, torch.Tensor]
TargetSpec = Literal["weight", "embeds"] | str | Sequence[str]

PERTURB_MASK = "perturb_mask"  # batch key: [B, L] 1 where a per-token perturbation may act
OFFSET_ATTRIBUTE = "advfunc_offset"  # the module attribute an offset hook reads
PROMPT_SUFFIX = "@prompt"


@dataclass(frozen=True)
class Layout:
    """Per-batch index tensors a target needs; computed once per step, outside any graph.

    ``row_of``: [B, L] slot of each token's embedding row (``"weight"``).
    ``row_live``: [N, 1] 1 for a slot holding a real, non-padding-idx row, else 0.
    ``row_token``: [N] the token id in each slot, −1 for unused slots.
    ``mask``: [B, L, 1] 1 at the tokens a per-token δ acts on (real tokens, restricted to
    the prompt and to the batch's :data:`PERTURB_MASK` when asked), as the δ dtype.
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
    batch_keys: tuple[str, ...]  # batch keys the target consumes; never passed to the model
    modules: tuple[nn.Module, ...]  # modules whose output receives an offset (besides the embedding)

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
    batch_keys: tuple[str, ...] = ()
    modules: tuple[nn.Module, ...] = ()

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


def token_mask(batch: Mapping[str, Any], prompt: bool, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, 1] the tokens a per-token δ acts on: real tokens, ∧ prompt, ∧ the batch's mask.

    The prompt is the real tokens whose label is −100 (a causal LM with completion-only
    labels; a row without one is refused). ``batch[PERTURB_MASK]`` ([B, L], nonzero
    where allowed) restricts further.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    allowed = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if prompt:
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(
                f"a target restricted to the prompt needs labels [batch, seq] with −100 at the prompt "
                f"(completion-only labels), got {got}"
            )
        allowed = allowed & (labels == -100)
        # Labels copied from input_ids leave no prompt: δ would be 0 there and the attack a silent no-op.
        has_prompt = allowed.any(dim=1)  # [B]
        require_on_device(
            has_prompt.all(),
            lambda: ValueError(
                f"row {int((~has_prompt).nonzero()[0, 0])} of the batch has no prompt token (a real token whose "
                "label is −100): a target restricted to the prompt needs completion-only labels, −100 at the prompt"
            ),
        )
    given = batch.get(PERTURB_MASK)
    if given is not None:
        if not isinstance(given, torch.Tensor) or given.shape != ids.shape:
            got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(f"batch[{PERTURB_MASK!r}] must be a [batch, seq] tensor like input_ids, got {got}")
        allowed = allowed & given.bool()
    return allowed.unsqueeze(-1).to(dtype)


class _TokenStates:
    """Per-token hidden states [B, L, H] per perturbed place (``delta_names``), masked like the batch's tokens.

    Norms are per example over (seq, hidden); padding, and the prompt's complement with
    ``prompt``, are never perturbed.
    """

    hidden: int
    dtype: torch.dtype
    prompt: bool
    delta_names: tuple[str, ...]

    def layout(self, batch: Mapping[str, Any]) -> Layout:
        ids = batch["input_ids"]
        return Layout(shape=(*ids.shape, self.hidden), mask=token_mask(batch, self.prompt, self.dtype))

    def zeros(self, layout: Layout, params: Params) -> Delta:
        device = next(iter(params.values())).device
        return {name: torch.zeros(layout.shape, dtype=self.dtype, device=device) for name in self.delta_names}

    def norm_dims(self, tensor: torch.Tensor) -> tuple[int, ...] | None:
        return tuple(range(1, tensor.dim()))


class EmbeddingOutput(_TokenStates):
    """``target="embeds"``: δ [B, L, H] added to the input-embedding output, padding masked.

    Norms are per example over (seq, hidden). The embedding matrix itself is never
    read for δ, so this works when it is frozen (LoRA/PEFT) or sharded. ``prompt``
    restricts δ to the prompt tokens (:func:`token_mask`).
    """

    kind = "embeds"
    delta_names = ("embeds",)
    reads_input_ids = True
    batch_keys: tuple[str, ...] = (PERTURB_MASK,)
    modules: tuple[nn.Module, ...] = ()

    def __init__(self, embedding: nn.Module, prompt: bool = False) -> None:
        weight = getattr(embedding, "weight", None)
        dim = getattr(embedding, "embedding_dim", None)
        if dim is None and isinstance(weight, torch.Tensor):
            dim = weight.shape[-1]
        if dim is None:
            raise ValueError(f"cannot tell the output width of the input embedding {type(embedding).__name__}")
        self.hidden = int(dim)
        self.dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        self.prompt = prompt

    def apply(self, params: Mapping[str, torch.Tensor], layout: Layout, delta: Delta) -> tuple[Params, Any]:
        assert layout.mask is not None
        return dict(params), delta["embeds"] * layout.mask  # [B, L, H]

    def public(self, delta: Delta) -> PublicDelta:
        return delta["embeds"]

    def internal(self, value: Any, layout: Layout, params: Params, what: str) -> Delta:
        assert layout.mask is not None
        # Padding is never perturbed: a given δ or gradient counts only at real tokens.
        return {"embeds": _checked_tensor(value, layout.shape, what, "[batch, seq, hidden]") * layout.mask}


class ModuleOutput(_TokenStates):
    """``target="model.layers.4"``: δ [B, L, H] added to the output of named submodules.

    Latent adversarial training perturbs the residual stream: the hidden states a
    decoder layer returns (the first element when it returns a tuple). δ holds one
    [B, L, H] tensor per module, keyed by its name, masked like ``"embeds"`` (padding,
    and the prompt with ``prompt``); norms are per example over (seq, hidden). H is the
    model's ``config.hidden_size`` (a module returning another width is refused at its
    first forward). The offset travels into ``functional_call`` as a substituted
    attribute of each module, which a forward hook held for the step adds.
    """

    kind = "module"
    reads_input_ids = True
    batch_keys: tuple[str, ...] = (PERTURB_MASK,)

    def __init__(self, model: nn.Module, names: Sequence[str], prompt: bool = False) -> None:
        found = dict(model.named_modules())
        self.module_names = list(names)
        self.delta_names = tuple(self.module_names)
        self.modules = tuple(found[name] for name in self.module_names)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(
                f"a module target needs the model's config.hidden_size (the width of the hidden states), "
                f"but {type(model).__name__} has none"
            )
        self.hidden = hidden
        weight = getattr(input_embedding(model), "weight", None)
        self.dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        self.prompt = prompt

    def apply(self, params: Mapping[str, torch.Tensor], layout: Layout, delta: Delta) -> tuple[Params, Any]:
        assert layout.mask is not None
        offsets = {f"{name}.{OFFSET_ATTRIBUTE}": delta[name] * layout.mask for name in self.module_names}
        return {**params, **offsets}, None

    def public(self, delta: Delta) -> PublicDelta:
        return delta[self.module_names[0]] if len(self.module_names) == 1 else dict(delta)

    def internal(self, value: Any, layout: Layout, params: Params, what: str) -> Delta:
        assert layout.mask is not None
        if len(self.module_names) == 1 and isinstance(value, torch.Tensor):
            value = {self.module_names[0]: value}
        if not isinstance(value, Mapping) or sorted(value) != sorted(self.module_names):
            got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise ValueError(f"{what} must be a dict with exactly the target's modules {self.module_names}, got {got}")
        return {
            name: _checked_tensor(value[name], layout.shape, f"{what}[{name!r}]", "[batch, seq, hidden]") * layout.mask
            for name in self.module_names
        }


class NamedParameters:
    """``target=[names]``: δ is a dict of parameter-shaped tensors, θ' = θ + δ.

    Each parameter has its own L2 norm, as the classic loop over matching names has.
    """

    kind = "params"
    reads_input_ids = False
    batch_keys: tuple[str, ...] = ()
    modules: tuple[nn.Module, ...] = ()

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
    matrix can perturb any parameter), and submodule names (a string, or a list of
    them) when it contains ``"embeds"`` (δ has the same [B, L, H] form). A per-token
    spec ending in ``"@prompt"`` perturbs the prompt only.
    """
    if isinstance(spec, str):
        name, prompt = (spec[: -len(PROMPT_SUFFIX)], True) if spec.endswith(PROMPT_SUFFIX) else (spec, False)
        if name in allowed:
            embedding = input_embedding(model)
            if name == "weight":
                if prompt:
                    raise ValueError(
                        "target='weight@prompt': the embedding matrix has no token positions; "
                        "use target='embeds@prompt'"
                    )
                _refuse_tied_embedding(model, embedding)
                return EmbeddingRows(embedding)
            return EmbeddingOutput(embedding, prompt)
        if "embeds" in allowed:
            return ModuleOutput(model, _module_names(model, [name], allowed), prompt)
        lists = " or a list of exact parameter names" if "weight" in allowed else ""
        raise ValueError(f"unknown target {spec!r}; candidates: {list(allowed)}{lists}")
    if isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec):
        modules = dict(model.named_modules())
        stripped = [n.removesuffix(PROMPT_SUFFIX) for n in spec]
        if "embeds" in allowed and stripped and ("weight" not in allowed or all(n in modules for n in stripped)):
            prompts = {n.endswith(PROMPT_SUFFIX) for n in spec}
            if len(prompts) != 1:
                raise ValueError(f"target modules {list(spec)}: give '@prompt' on every name or on none")
            return ModuleOutput(model, _module_names(model, stripped, allowed), prompts.pop())
        if "weight" in allowed:
            return NamedParameters(spec, dict(model.named_parameters()))
    raise ValueError(f"target must be one of {list(allowed)} or a list of parameter names, got {spec!r}")


def _module_names(model: nn.Module, names: list[str], allowed: Sequence[str]) -> list[str]:
    """``names`` checked as submodules of ``model`` whose output δ can be added to."""
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    for name in names:
        if name in parameters:
            fix = (
                f"perturb parameters with the list form target=[{name!r}]"
                if "weight" in allowed
                else f"name the module that holds it, {name.rpartition('.')[0]!r}, or a layer"
            )
            raise ValueError(f"target {name!r} is a parameter, not a module; {fix}")
        if name not in modules or name == "":
            raise ValueError(
                f"unknown target {name!r}: neither one of {list(allowed)} nor a submodule of "
                f"{type(model).__name__}; candidates: {_preview(_layer_like(modules))}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"target modules repeat: {names}")
    return names


def _layer_like(modules: Mapping[str, nn.Module]) -> list[str]:
    """Module names to suggest: the repeated blocks first (a decoder's layers), then the rest."""
    layers = [f"{name}.{i}" for name, m in modules.items() if isinstance(m, nn.ModuleList) for i in range(len(m))]
    return layers + [name for name in modules if name and name not in layers]


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
