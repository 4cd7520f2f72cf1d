"""Gradient engines: one forward+backward of the perturbed model as a pure function.

Two engines give the same numbers. The eager engine differentiates ``functional_call``
with ``torch.autograd.grad`` on fresh leaves of its own: in eager mode that is cheaper
than ``torch.func.grad``, whose per-operator dispatch costs 10–20% on a BERT step. The
compiled engine differentiates with ``torch.func.grad_and_value`` and runs under
``torch.compile(fullgraph=True)``, which removes that dispatch cost. Neither touches the
caller's tensors, their ``.grad`` or the model's mode.

Every pass takes a prepared :class:`~advfunc.core.step.Call` and a perturbation δ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import grad, grad_and_value

from advfunc.core.checkpointing import checkpointed_layers
from advfunc.core.model import PerturbedModel, logits_of
from advfunc.core.params import Params
from advfunc.core.prefix import PrefixCache, prefix_plan
from advfunc.core.step import Call
from advfunc.core.targets import Delta, Layout, Target

# divergence(reference, logits, positions): positions [B, L] bool or None (all count)
Divergence = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class Pass(NamedTuple):
    """What one forward+backward returns (everything detached)."""

    loss: torch.Tensor  # [] the unscaled loss
    logits: torch.Tensor | None  # [B, C] when the model returns logits
    param_grads: Params  # ∂(scale·L)/∂θ for the trainable θ
    delta_grads: Delta  # ∂(scale·L)/∂δ; {} when not asked


def owned(grads: Params) -> Params:
    """``grads`` with every tensor contiguous and in storage of its own, safe to add into.

    autograd may hand back one tensor for two inputs (the backward of ``a + b``) or a
    broadcast view (the backward of ``sum``); accumulating in place into those would
    corrupt a neighbour. Ordinary gradients pass through without a copy.
    """
    seen: set[int] = set()
    safe: Params = {}
    for name, tensor in grads.items():
        if not tensor.is_contiguous() or tensor._base is not None or tensor.data_ptr() in seen:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.numel():
            seen.add(tensor.data_ptr())
        safe[name] = tensor
    return safe


def _plus(offset: torch.Tensor | None, probe: torch.Tensor | None) -> torch.Tensor | None:
    """offset + probe, either of which may be absent."""
    if probe is None:
        return offset
    return probe if offset is None else offset + probe


def _logits(outputs: Any) -> torch.Tensor | None:
    logits = getattr(outputs, "logits", None)
    return logits.detach() if isinstance(logits, torch.Tensor) else None


class Engine:
    """Passes of L(θ, δ) = the model's loss with δ placed by ``target``.

    ``full`` gives ∂/∂θ (and ∂/∂δ when asked); ``delta_only`` gives ∂/∂δ and forms no
    parameter gradient. With ``divergence`` the δ-only objective is
    ``divergence(reference, logits(θ, δ))`` instead of the loss (VAT, SMART).
    """

    def __init__(
        self, model: PerturbedModel, target: Target, compiled: bool, divergence: Divergence | None = None
    ) -> None:
        self.model = model
        self.target = target
        self.compiled = compiled
        self.divergence = divergence
        self._full_cache: dict[tuple[bool, str | None], Callable[..., Any]] = {}
        self._prefix_plan = None if compiled else prefix_plan(model.model, target)
        differentiate = grad(self._delta_objective)

        def delta_grad(
            params: Params,
            kwargs: Mapping[str, Any],
            layout: Layout,
            delta: Delta,
            scale: torch.Tensor,
            reference: torch.Tensor | None,
        ) -> Delta:
            return differentiate(delta, params, kwargs, layout, scale, reference)

        self._func_delta_grad = delta_grad

    def loss(
        self,
        params: Mapping[str, torch.Tensor],
        kwargs: Mapping[str, Any],
        layout: Layout,
        delta: Delta,
        probe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """(L(θ, δ), the model's outputs): one forward with ``delta`` placed by the target.

        ``probe`` [B, L, H] (a zero leaf, :meth:`PerturbedModel.probe`) is added to the
        embedding output too, so that its gradient is ∂L/∂(embedding output).
        """
        placed, offset = self.target.apply(params, layout, delta)
        return self.model.loss(placed, kwargs, _plus(offset, probe))

    def outputs(
        self,
        params: Mapping[str, torch.Tensor],
        kwargs: Mapping[str, Any],
        layout: Layout,
        delta: Delta,
        probe: torch.Tensor | None = None,
    ) -> Any:
        """The model's outputs at (θ, δ), without a loss (divergence objectives); ``probe`` as in :meth:`loss`."""
        placed, offset = self.target.apply(params, layout, delta)
        return self.model.outputs(placed, kwargs, _plus(offset, probe))

    def rows_name(self, call: Call) -> str | None:
        """The embedding matrix's name when a pass of ``call`` forms its gradient by rows, else None.

        By rows: the matrix is not a leaf; a zero probe [B, L, H] at the embedding output
        takes ∂L/∂(W[ids]) and :meth:`PerturbedModel.rows_gradient` adds it into the
        step's [V, H] buffer by token id, so no pass allocates a second vocabulary-sized
        gradient. Needs the offset hook in place (inside ``hooked()``), 2-D ``input_ids``
        and a matrix the target does not perturb itself.
        """
        name = self.model.rows_name
        ids = call.kwargs.get("input_ids")
        if (
            name is None
            or name not in call.trainable
            or name in getattr(self.target, "names", ())
            or not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or not self.model.hook_active()
        ):
            return None
        return name

    def objective(
        self,
        params: Mapping[str, torch.Tensor],
        kwargs: Mapping[str, Any],
        layout: Layout,
        delta: Delta,
        probe: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """(objective, outputs): L(θ, δ), or divergence(reference, logits(θ, δ)) when ``reference`` is given.

        The divergence counts a causal LM's completion positions only
        (:meth:`PerturbedModel.counted_positions`).
        """
        if reference is None:
            return self.loss(params, kwargs, layout, delta, probe)
        if self.divergence is None:
            raise ValueError("a reference for the objective needs an engine built with a divergence")
        outputs = self.outputs(params, kwargs, layout, delta, probe)
        logits = logits_of(outputs)
        return self.divergence(reference, logits, self.model.counted_positions(kwargs, logits)), outputs

    def _delta_objective(
        self,
        delta: Delta,
        params: Params,
        kwargs: Mapping[str, Any],
        layout: Layout,
        scale: torch.Tensor,
        reference: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.divergence is not None and reference is None:
            raise ValueError("this engine's δ-only objective is a divergence from reference logits; none given")
        return self.objective(params, kwargs, layout, delta, None, reference)[0] * scale

    def full(
        self,
        call: Call,
        delta: Delta,
        *,
        with_delta_grad: bool,
        scale: torch.Tensor | None = None,
        accumulate_into: Params | None = None,
        reference: torch.Tensor | None = None,
        final: bool = True,
    ) -> Pass:
        """One forward+backward: ∂(scale·L(θ, δ))/∂θ for the trainable θ (and ∂/∂δ if asked).

        With ``reference`` [B, C] the objective is divergence(reference, logits(θ, δ))
        instead of L (VAT's adversarial pass); ``Pass.loss`` is then that divergence.
        ``scale`` (default: the call's loss scale) carries FreeLB's 1/K and a
        mixed-precision loss scale. With ``accumulate_into`` (the step's own gradient
        buffers from an earlier pass), the parameter gradients are added into those
        buffers, which are returned: each parameter's gradient is added as soon as
        backward produces it (compiled: inside the compiled graph), so a step holds one
        gradient dict. The embedding matrix W, when taken by rows (:meth:`rows_name`),
        gets ∂L/∂(W[ids]) [B, L, H]; ``final=False`` leaves W's entry in that form for a
        later pass of the same call to add into, and the final pass adds the sum by token
        id into W's [V, H] gradient, after the earlier passes' activations are gone: the
        step's only vocabulary-sized tensor. Cost: one forward + one backward.
        """
        scale = call.scale if scale is None else scale
        rows = self.rows_name(call)
        into = accumulate_into
        if self.compiled:
            fn = self._compiled_full(with_delta_grad, rows)
            leaves = {n: call.params[n] for n in call.trainable if n != rows}
            probe = self.model.probe(call.kwargs["input_ids"]) if rows else None
            others = None if into is None else {n: t for n, t in into.items() if n != rows}
            loss, logits, param_grads, at_output, delta_grads = fn(
                leaves, probe, delta, call.params, call.kwargs, call.layout, scale, others, reference
            )
        else:
            leaves = {n: call.params[n].detach().requires_grad_(True) for n in call.trainable if n != rows}
            if into is not None:
                for name, leaf in leaves.items():
                    # The hook's result is what autograd.grad captures: the buffer itself, so
                    # the fresh gradient is freed right after it is added.
                    leaf.register_hook(into[name].add_)
            probe = self.model.probe(call.kwargs["input_ids"]).requires_grad_(True) if rows else None
            probes = [] if probe is None else [probe]
            delta_in = {k: v.detach().requires_grad_(with_delta_grad) for k, v in delta.items()}
            loss, outputs = self.objective(
                {**call.params, **leaves}, call.kwargs, call.layout, delta_in, probe, reference
            )
            wrt = [*leaves.values(), *probes, *(delta_in.values() if with_delta_grad else ())]
            grads = torch.autograd.grad(loss * scale, wrt, allow_unused=True, materialize_grads=True)
            # An unused parameter's hook never runs; its buffer already holds the right sum.
            named = grads[: len(leaves)]
            param_grads = dict(into) if into is not None else owned(dict(zip(leaves, named, strict=True)))
            at_output = grads[len(leaves)] if rows else None
            at_delta = grads[len(leaves) + len(probes) :]
            delta_grads = dict(zip(delta_in, at_delta, strict=True)) if with_delta_grad else {}
            loss, logits = loss.detach(), _logits(outputs)
        if rows:
            assert at_output is not None
            param_grads[rows] = self._add_rows(call, at_output, None if into is None else into[rows], final)
        return Pass(loss, logits, {n: param_grads[n] for n in call.trainable}, delta_grads)

    def _add_rows(self, call: Call, at_output: torch.Tensor, into: torch.Tensor | None, final: bool) -> torch.Tensor:
        """W's entry after a pass: the running ∂L/∂(W[ids]) [B, L, H], or (``final``) W's [V, H] gradient."""
        ids = call.kwargs["input_ids"]
        if into is not None and into.dim() == 2:  # an earlier pass already formed [V, H]: add by rows
            return self.model.rows_gradient(ids, at_output, into)
        # The clone: autograd may hand the same tensor to another input (the offset's δ).
        pending = at_output.clone() if into is None else into.add_(at_output)  # [B, L, H]
        return self.model.rows_gradient(ids, pending, None) if final else pending

    def prefix_cache(self) -> PrefixCache | None:
        """A new step's record of the layers before a module target (:mod:`advfunc.core.prefix`); None: none to skip.

        Eager only: a compiled δ-only pass runs the whole model.
        """
        return None if self._prefix_plan is None else PrefixCache(self._prefix_plan)

    def delta_only(
        self,
        params: Params,
        kwargs: Mapping[str, Any],
        layout: Layout,
        delta: Delta,
        scale: torch.Tensor,
        reference: torch.Tensor | None = None,
        prefix: PrefixCache | None = None,
    ) -> Delta:
        """One forward and a backward to δ only: ∂(scale·objective(θ, δ))/∂δ. No parameter gradient.

        Takes the call's pieces rather than the call, so that a compiled attack can trace
        it. ``scale`` is a 0-dim tensor (a loss scale keeps fp16 activation gradients from
        underflowing; an ascent direction does not depend on it). ``reference``: the clean
        logits a divergence objective compares with. ``prefix``: the step's
        :meth:`prefix_cache`, shared by its δ-only passes (same θ and batch): the first
        records the layers before a module target, the later ones skip them.
        """
        if self.compiled:
            return self._func_delta_grad(params, kwargs, layout, delta, scale, reference)
        delta_in = {k: v.detach().requires_grad_(True) for k, v in delta.items()}
        detached = {n: p.detach() for n, p in params.items()}
        with contextlib.nullcontext() if prefix is None else prefix.forward():
            objective = self._delta_objective(delta_in, detached, kwargs, layout, scale, reference)
        grads = torch.autograd.grad(objective, list(delta_in.values()), allow_unused=True, materialize_grads=True)
        return dict(zip(delta_in, grads, strict=True))

    def _compiled_full(self, with_delta_grad: bool, rows: str | None) -> Callable[..., Any]:
        """The full pass as one ``torch.compile(fullgraph=True)`` graph, accumulation included.

        Adding into the step's buffers inside the graph lets Inductor write each sum in
        place, so no second gradient dict leaves the graph.
        """
        key = (with_delta_grad, rows)
        if key not in self._full_cache:

            def scaled_loss(
                leaves: Params,
                probe: torch.Tensor | None,
                delta: Delta,
                params: Params,
                kwargs: Mapping[str, Any],
                layout: Layout,
                scale: torch.Tensor,
                reference: torch.Tensor | None,
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
                loss, outputs = self.objective({**params, **leaves}, kwargs, layout, delta, probe, reference)
                return loss * scale, (loss.detach(), _logits(outputs))

            argnums = (0, *((1,) if rows else ()), *((2,) if with_delta_grad else ()))
            differentiate = grad_and_value(scaled_loss, argnums=argnums, has_aux=True)

            def full_pass(
                leaves: Params,
                probe: torch.Tensor | None,
                delta: Delta,
                params: Params,
                kwargs: Mapping[str, Any],
                layout: Layout,
                scale: torch.Tensor,
                into: Params | None,
                reference: torch.Tensor | None,
            ) -> tuple[torch.Tensor, torch.Tensor | None, Params, torch.Tensor | None, Delta]:
                grads, (_, (loss, logits)) = differentiate(
                    leaves, probe, delta, params, kwargs, layout, scale, reference
                )
                param_grads = dict(grads[0])
                if into is not None:
                    param_grads = {n: into[n].add_(g) for n, g in param_grads.items()}
                at_output = grads[1] if rows else None  # [B, L, H]: added into W's entry outside
                return loss, logits, param_grads, at_output, grads[-1] if with_delta_grad else {}

            self._full_cache[key] = compile_pass(full_pass)
        return self._full_cache[key]


def compile_pass(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True)``; past dynamo's recompile limit, an error that says why and what to do.

    A compiled pass is traced per input shape, and inside ``torch.func.grad`` dynamo
    specialises the sequence length, so batches padded each to its own longest example
    compile new graphs at every new length until ``torch._dynamo.config.recompile_limit``
    stops them, where ``fullgraph=True`` can only fail.
    """
    compiled = torch.compile(fn, fullgraph=True)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            raise ValueError(
                "the compiled step has been traced for more input shapes than torch._dynamo.config.recompile_limit "
                f"({torch._dynamo.config.recompile_limit}) allows: every new sequence length compiles new graphs. "
                "Pad each batch to a multiple of a bucket (pad_to_multiple_of=16 in the tokenizer or "
                "DataCollatorWithPadding), raise the limit, or build the step with compile=False"
            ) from error

    return call


def resolve_compile(compile: bool | None, model: nn.Module) -> bool:
    """``compile=None`` means: compile when the model's parameters live on CUDA and it checkpoints no layer.

    A compiled step differentiates with ``torch.func.grad``, inside which activation
    checkpointing's input hook (``requires_grad_`` on the embedding output) cannot run.
    """
    if compile is None:
        first = next(model.parameters(), None)
        return bool(first is not None and first.is_cuda and not checkpointed_layers(model))
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True, False or None (auto: CUDA only), got {compile!r}")
    if compile and checkpointed_layers(model):
        raise ValueError(
            "compile=True cannot run under activation checkpointing (torch.func.grad cannot run its "
            "requires_grad_ input hook); build the step with compile=False, or turn checkpointing off"
        )
    return compile
