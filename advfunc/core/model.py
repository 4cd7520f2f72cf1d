"""The model as a pure function: loss(θ, batch, offset) through ``functional_call``.

Embedding-space perturbations enter as an addition to the output of the model's
input-embedding module, so the model still reads ``input_ids`` its own way (RoBERTa's
padding-aware positions, GPT-2's last-token pooling). The offset travels into the call
as a substituted attribute of the embedding module, read by a forward hook that exists
only for the duration of a step: the model is the same object before and after. A
module target (a decoder layer's output) is reached the same way, by a hook on that
module.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from advfunc.core.batch import BatchSpec, check_batch, label_rule
from advfunc.core.checkpointing import replayable_checkpoints
from advfunc.core.divergence import label_positions
from advfunc.core.sharding import refuse_sharded
from advfunc.core.targets import OFFSET_ATTRIBUTE as _OFFSET_ATTRIBUTE
from advfunc.core.targets import input_embedding

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def _add_offset(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: ``out + module.advfunc_offset`` while ``functional_call`` supplies it.

    A module returning a tuple (a decoder layer with its attention weights or cache)
    gets the offset on its first element, the hidden states.
    """
    offset = getattr(module, _OFFSET_ATTRIBUTE, None)
    if offset is None:
        return output
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor) or hidden.shape != offset.shape:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"{type(module).__name__} returned {got} but the perturbation has {tuple(offset.shape)}: "
            "an embedding must embed the batch's input_ids, a module target must return hidden states "
            "[batch, seq, hidden_size]"
        )
    moved = hidden + offset.to(hidden.dtype)
    return (moved, *output[1:]) if isinstance(output, tuple) else moved


class OffsetHook:
    """The one offset hook of an embedding module, shared by every step running on it.

    A step nested in another step's ``loss_fn`` runs while the outer step's hook is
    registered; a second hook would add the inner offset twice. So the hook is
    registered once per module and counted by the steps holding it; each forward adds
    the offset of the innermost ``functional_call`` exactly once. ``calls`` counts the
    forwards that received an offset (eager steps only: under ``torch.compile`` a Python
    counter would be specialised on and recompile every call).
    """

    def __init__(self, embedding: nn.Module, count: bool) -> None:
        self.users = 0
        self.calls = 0
        self.handle = embedding.register_forward_hook(self._counting if count else _add_offset)

    def _counting(self, module: nn.Module, args: Any, output: Any) -> Any:
        if getattr(module, _OFFSET_ATTRIBUTE, None) is not None:
            self.calls += 1
        return _add_offset(module, args, output)


_ACTIVE_HOOKS: weakref.WeakKeyDictionary[nn.Module, OffsetHook] = weakref.WeakKeyDictionary()


class OffsetCalls:
    """The number of offset-carrying calls of the hooked modules since a step took their hooks."""

    def __init__(self, hooks: list[OffsetHook]) -> None:
        self.hooks = hooks
        self.start = sum(hook.calls for hook in hooks)

    @property
    def calls(self) -> int:
        return sum(hook.calls for hook in self.hooks) - self.start


def accepted_keywords(model: nn.Module) -> set[str]:
    """The keyword arguments ``model.forward`` takes, including those of a typed ``**kwargs``.

    Recent transformers declare flags such as ``output_hidden_states`` as
    ``**kwargs: Unpack[TransformersKwargs]``; their keys count as accepted. An untyped
    ``**kwargs`` accepts nothing extra: a misspelt key must not vanish silently.
    """
    signature = inspect.signature(model.forward)
    accepted = {name for name, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_keyword = [name for name, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD]
    if var_keyword:
        try:
            hints = typing.get_type_hints(model.forward, include_extras=True)
        except Exception:  # unresolvable annotations: keep the named arguments only
            hints = {}
        for arg in typing.get_args(hints.get(var_keyword[0])):
            keys = getattr(arg, "__required_keys__", frozenset()) | getattr(arg, "__optional_keys__", frozenset())
            accepted |= set(keys)
    return accepted


class PerturbedModel:
    """``model`` seen as ``loss(params, batch, offset) -> (loss, outputs)``.

    ``loss_fn(outputs, batch)`` replaces ``outputs.loss`` when given. ``modules``: the
    submodules a module target adds offsets to; their hooks are held with the
    embedding's.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        autocast: torch.dtype | None = None,
        modules: tuple[nn.Module, ...] = (),
    ) -> None:
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, batch), got {type(loss_fn).__name__}")
        refuse_sharded(model)  # FSDP/ZeRO-3 hooks would bypass functional_call: zero grads, no error
        self.model = model
        self.loss_fn = loss_fn
        self.autocast = autocast
        self.embedding = input_embedding(model)
        module_names = {module: name for name, module in model.named_modules()}
        prefix = module_names.get(self.embedding)
        if prefix is None:
            raise ValueError("get_input_embeddings() returned a module that is not inside the model")
        self.offset_key = f"{prefix}.{_OFFSET_ATTRIBUTE}" if prefix else _OFFSET_ATTRIBUTE
        self.num_embeddings = getattr(self.embedding, "num_embeddings", None)
        self.rows_name = _rows_name(model, self.embedding)
        self.accepted = accepted_keywords(model)
        self.pass_return_dict = "return_dict" in self.accepted
        self.hooked_modules = (self.embedding, *(m for m in modules if m is not self.embedding))
        self.causal = is_causal_lm(model)

    def counted_positions(self, kwargs: Mapping[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        """[B, L] bool: the positions a KL between two forwards of a causal LM compares; None: all.

        A causal LM's logits [B, L, V] count where its loss does: at the completion tokens
        the labels mark (:func:`~advfunc.core.divergence.label_positions`), never at the
        prompt or padding; without labels, at every real token. Other models (one logit
        vector per example, or per token for token classification) count every position.
        """
        if not self.causal or logits.dim() != 3:
            return None
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.shape == logits.shape[:-1]:
            return label_positions(labels)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:-1]:
            return mask.bool()
        return None

    def check_batch(
        self, batch: Any, needs_ids: bool = True, needs_loss: bool = True, device: torch.device | None = None
    ) -> dict[str, Any]:
        """Validate ``batch`` (:func:`~advfunc.core.batch.check_batch`); return the call kwargs.

        ``needs_loss=False`` admits a batch without labels (for methods whose objective is
        built from logits, such as VAT on unlabelled text). ``device``: where the batch
        must be, the model's by default.
        """
        spec = BatchSpec(
            model_name=type(self.model).__name__,
            accepted=frozenset(self.accepted),
            vocabulary=self.num_embeddings,
            own_loss=self.loss_fn is None,
            labels=None if self.loss_fn is not None else label_rule(self.model),  # problem_type can change per call
        )
        if device is None:
            device = next(self.model.parameters()).device
        kwargs = check_batch(spec, batch, device, needs_ids=needs_ids, needs_loss=needs_loss)
        if self.pass_return_dict:
            kwargs["return_dict"] = True
        return kwargs

    @contextlib.contextmanager
    def hooked(self, count: bool = True) -> Iterator[OffsetCalls | None]:
        """Hold the embedding's offset hook for the length of one step; removed with its last holder.

        Yields an ``OffsetCalls`` counter when ``count`` (eager), else None (compiled).
        """
        refuse_sharded(self.model)  # a step built on gathered FSDP2 parameters, called once they are sharded again
        hooks = []
        for module in self.hooked_modules:
            hook = _ACTIVE_HOOKS.get(module)
            if hook is None:
                hook = _ACTIVE_HOOKS[module] = OffsetHook(module, count)
            hook.users += 1
            hooks.append((module, hook))
        try:
            yield OffsetCalls([hook for _, hook in hooks]) if count else None
        finally:
            for module, hook in hooks:
                hook.users -= 1
                if hook.users == 0:
                    hook.handle.remove()
                    del _ACTIVE_HOOKS[module]

    def hook_active(self) -> bool:
        """Whether the offset hook is registered (inside ``hooked()``): a probe can reach the model."""
        return self.embedding in _ACTIVE_HOOKS

    def probe(self, ids: torch.Tensor) -> torch.Tensor:
        """Zeros [B, L, H] to add to the embedding output: differentiated, they give ∂L/∂(W[ids])."""
        weight = typing.cast(torch.Tensor, self.embedding.weight)
        return torch.zeros((*ids.shape, weight.shape[1]), dtype=weight.dtype, device=weight.device)

    def rows_gradient(self, ids: torch.Tensor, grad: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        """∂L/∂W = Σ_{b,l} e_{ids[b,l]} grad[b,l]ᵀ from grad = ∂L/∂(W[ids]) [B, L, H]; [V, H].

        What ``nn.Embedding``'s backward computes (the padding_idx row gets nothing), but
        added in place into ``into`` (the step's buffer from an earlier pass) when given,
        so no second vocabulary-sized tensor exists. ``index_add_`` is deterministic
        under ``torch.use_deterministic_algorithms(True)``, as the embedding backward is.
        """
        weight = typing.cast(torch.Tensor, self.embedding.weight)
        flat = ids.reshape(-1)
        rows = grad.reshape(flat.numel(), -1).to(weight.dtype)  # [B·L, H]
        padding_idx = getattr(self.embedding, "padding_idx", None)
        if padding_idx is not None:
            rows = rows * (flat != padding_idx).unsqueeze(1).to(rows.dtype)
        base = torch.zeros_like(weight) if into is None else into
        return base.index_add_(0, flat, rows)

    def outputs(
        self, params: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any], offset: torch.Tensor | None
    ) -> Any:
        """The model's outputs at ``params`` with ``offset`` [B, L, H] added to the embedding output.

        Call inside ``hooked()``. One forward pass, under ``torch.autocast`` when the model
        was given an autocast dtype (the offset and all norms stay in float32).
        """
        state = dict(params)
        if offset is not None:
            state[self.offset_key] = offset
        autocast: Any = contextlib.nullcontext()
        if self.autocast is not None:
            autocast = torch.autocast(device_type=next(iter(state.values())).device.type, dtype=self.autocast)
        with autocast, replayable_checkpoints(self.model):
            return functional_call(self.model, state, (), dict(kwargs), strict=False)

    def loss(
        self, params: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any], offset: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        """(loss, outputs) at ``params`` with ``offset`` [B, L, H] added to the embedding output.

        Call inside ``hooked()``. One forward pass.
        """
        outputs = self.outputs(params, kwargs, offset)
        loss: Any = self.loss_fn(outputs, kwargs) if self.loss_fn is not None else getattr(outputs, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(
                f"the model returned no loss tensor (got {type(loss).__name__}); pass labels in the batch "
                "or give the factory loss_fn(outputs, batch)"
            )
        if loss.dim() != 0:
            loss = loss.mean()
        return loss, outputs


def _rows_name(model: nn.Module, embedding: nn.Module) -> str | None:
    """The input-embedding matrix's name when its gradient can be formed from ∂L/∂(embedding output).

    That holds when the matrix W is read only as ``nn.Embedding``'s own lookup W[ids]: a
    subclass may scale its output, ``max_norm`` renormalises W, ``scale_grad_by_freq`` and
    ``sparse`` change the gradient, and a tied output head (any second name for W) reads
    W itself. Otherwise None: W stays an autograd leaf with its dense gradient.
    """
    weight = getattr(embedding, "weight", None)
    if (
        type(embedding).forward is not nn.Embedding.forward
        or not isinstance(weight, nn.Parameter)
        or not weight.requires_grad
        or getattr(embedding, "max_norm", None) is not None
        or getattr(embedding, "scale_grad_by_freq", False)
        or getattr(embedding, "sparse", False)
    ):
        return None
    names = [name for name, p in model.named_parameters(remove_duplicate=False) if p is weight]
    return names[0] if len(names) == 1 else None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder-only language model (its logits at t predict token t + 1).

    Hugging Face marks generative models with ``can_generate()``; encoder-decoders
    generate too but score their decoder labels unshifted. A PEFT wrapper is judged by
    the model it wraps.
    """
    unwrap: Any = getattr(model, "get_base_model", None)
    inner = unwrap() if callable(unwrap) else model
    can_generate = getattr(inner, "can_generate", None)
    config = getattr(inner, "config", None)
    return bool(callable(can_generate) and can_generate() and not getattr(config, "is_encoder_decoder", False))


def logits_of(outputs: Any) -> torch.Tensor:
    """``outputs.logits``, or a ``ValueError`` saying the caller needs them."""
    logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"the model's outputs ({type(outputs).__name__}) have no 'logits' tensor; this method compares "
            "or attacks the model's predictions, so the model must return logits"
        )
    return logits


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H] the mean of ``hidden`` [B, L, H] over the positions where ``mask`` [B, L] is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
