"""Gradient engines: one forward+backward of ``PerturbedModel`` as a pure function.

Two engines give the same numbers. The eager engine differentiates ``functional_call``
with ``torch.autograd.grad`` on fresh leaves of its own: in eager mode that is cheaper
than ``torch.func.grad``, whose per-operator dispatch costs 10–20% on a BERT step. The
compiled engine differentiates with ``torch.func.grad_and_value`` and runs under
``torch.compile(fullgraph=True)``, which removes that dispatch cost. Neither touches the
caller's tensors, their ``.grad`` or the model's mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import grad, grad_and_value

from advfunc.forward import PerturbedModel
from advfunc.parameters import Params
from advfunc.targets import Delta, Layout, NamedParameters, Target


class Pass(NamedTuple):
    """What one forward+backward returns (everything detached)."""

    loss: torch.Tensor  # [] the unscaled loss
    logits: torch.Tensor | None  # [B, C] when the model returns logits
    param_grads: Params  # ∂(scale·L)/∂θ for the trainable θ; {} when not asked
    delta_grads: Delta  # ∂(scale·L)/∂δ; {} when not asked


def perturbed_loss(
    model: PerturbedModel,
    target: Target,
    params: Mapping[str, torch.Tensor],
    kwargs: Mapping[str, Any],
    layout: Layout,
    delta: Delta,
) -> tuple[torch.Tensor, Any]:
    """L(θ, δ): the loss with ``delta`` applied where ``target`` puts it."""
    if isinstance(target, NamedParameters):
        moved = {**params, **{name: params[name] + delta[name] for name in target.names}}
        return model.loss(moved, kwargs, None)
    return model.loss(params, kwargs, target.offset(delta, layout))


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


def _logits(outputs: Any) -> torch.Tensor | None:
    logits = getattr(outputs, "logits", None)
    return logits.detach() if isinstance(logits, torch.Tensor) else None


class Engine:
    """``full`` (grads of θ and optionally δ) and ``delta_only`` (grads of δ) passes."""

    def __init__(self, model: PerturbedModel, target: Target, compiled: bool) -> None:
        self.model = model
        self.target = target
        self.compiled = compiled
        self._full_cache: dict[bool, Callable[..., Any]] = {}
        self._delta_fn: Callable[..., Any] | None = None

    def full(
        self,
        params: Params,
        trainable: list[str],
        kwargs: Mapping[str, Any],
        layout: Layout,
        delta: Delta,
        with_delta_grad: bool,
        scale: float | torch.Tensor = 1.0,
        accumulate_into: Params | None = None,
    ) -> Pass:
        """One forward+backward: ∂(scale·L(θ, δ))/∂θ for the trainable θ (and ∂/∂δ if asked).

        ``scale`` carries FreeLB's 1/K and a mixed-precision loss scale. With
        ``accumulate_into`` (the step's own gradient buffers from an earlier pass), the
        parameter gradients are added into those buffers, which are returned: the eager
        engine adds each parameter's gradient as soon as backward produces it, so a step
        never holds two full gradient dicts at once.
        """
        if self.compiled:
            fn = self._compiled_full(with_delta_grad)
            scale_tensor = torch.as_tensor(scale, dtype=torch.float32, device=next(iter(params.values())).device)
            loss, logits, param_grads, delta_grads = fn(
                {n: params[n] for n in trainable}, delta, params, kwargs, layout, scale_tensor
            )
            if accumulate_into is not None:
                param_grads = {n: accumulate_into[n].add_(g) for n, g in param_grads.items()}
            return Pass(loss, logits, param_grads, delta_grads)
        leaves = {n: params[n].detach().requires_grad_(True) for n in trainable}
        if accumulate_into is not None:
            for name, leaf in leaves.items():
                # The hook's result is what autograd.grad captures: the buffer itself, so
                # the fresh gradient is freed right after it is added.
                leaf.register_hook(accumulate_into[name].add_)
        delta_in = {k: v.detach().requires_grad_(with_delta_grad) for k, v in delta.items()}
        loss, outputs = perturbed_loss(self.model, self.target, {**params, **leaves}, kwargs, layout, delta_in)
        wrt = [*leaves.values(), *(delta_in.values() if with_delta_grad else ())]
        scaled = loss if isinstance(scale, float) and scale == 1.0 else loss * scale
        grads = torch.autograd.grad(scaled, wrt, allow_unused=True, materialize_grads=True)
        # An unused parameter's hook never runs; its buffer already holds the right sum.
        param_grads = (
            dict(accumulate_into)
            if accumulate_into is not None
            else owned(dict(zip(leaves, grads[: len(leaves)], strict=True)))
        )
        delta_grads = dict(zip(delta_in, grads[len(leaves) :], strict=True)) if with_delta_grad else {}
        return Pass(loss.detach(), _logits(outputs), param_grads, delta_grads)

    def delta_only(
        self, params: Params, kwargs: Mapping[str, Any], layout: Layout, delta: Delta, scale: torch.Tensor
    ) -> Delta:
        """One forward and a backward to δ only: ∂(scale·L(θ, δ))/∂δ. No parameter gradient is formed.

        ``scale`` is a 0-dim tensor (a loss scale keeps fp16 activation gradients from
        underflowing; the ascent direction does not depend on it).
        """
        if self.compiled:
            return self.delta_grad_function()(params, kwargs, layout, delta, scale)
        return self._eager_delta_grad(params, kwargs, layout, delta, scale)

    def _eager_delta_grad(
        self, params: Params, kwargs: Mapping[str, Any], layout: Layout, delta: Delta, scale: torch.Tensor
    ) -> Delta:
        delta_in = {k: v.detach().requires_grad_(True) for k, v in delta.items()}
        detached = {n: p.detach() for n, p in params.items()}
        loss, _ = perturbed_loss(self.model, self.target, detached, kwargs, layout, delta_in)
        grads = torch.autograd.grad(loss * scale, list(delta_in.values()), allow_unused=True, materialize_grads=True)
        return dict(zip(delta_in, grads, strict=False))

    def delta_grad_function(self) -> Callable[[Params, Mapping[str, Any], Layout, Delta, torch.Tensor], Delta]:
        """∂L/∂δ as a ``torch.func.grad`` function, traceable under ``torch.compile``."""
        if self._delta_fn is None:

            def loss_of_delta(
                delta: Delta, params: Params, kwargs: Mapping[str, Any], layout: Layout, scale: torch.Tensor
            ) -> torch.Tensor:
                return perturbed_loss(self.model, self.target, params, kwargs, layout, delta)[0] * scale

            differentiate = grad(loss_of_delta)

            def delta_grad(
                params: Params, kwargs: Mapping[str, Any], layout: Layout, delta: Delta, scale: torch.Tensor
            ) -> Delta:
                return differentiate(delta, params, kwargs, layout, scale)

            self._delta_fn = delta_grad
        return self._delta_fn

    def _compiled_full(self, with_delta_grad: bool) -> Callable[..., Any]:
        key = with_delta_grad
        if key not in self._full_cache:

            def scaled_loss(
                leaves: Params,
                delta: Delta,
                params: Params,
                kwargs: Mapping[str, Any],
                layout: Layout,
                scale: torch.Tensor,
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
                loss, outputs = perturbed_loss(self.model, self.target, {**params, **leaves}, kwargs, layout, delta)
                return loss * scale, (loss.detach(), _logits(outputs))

            argnums = (0, 1) if with_delta_grad else 0
            differentiate = grad_and_value(scaled_loss, argnums=argnums, has_aux=True)

            def full_pass(
                leaves: Params,
                delta: Delta,
                params: Params,
                kwargs: Mapping[str, Any],
                layout: Layout,
                scale: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor | None, Params, Delta]:
                grads, (_, (loss, logits)) = differentiate(leaves, delta, params, kwargs, layout, scale)
                if with_delta_grad:
                    return loss, logits, grads[0], grads[1]
                return loss, logits, grads, {}

            self._full_cache[key] = torch.compile(full_pass, fullgraph=True)
        return self._full_cache[key]


def resolve_compile(compile: bool | None, model: nn.Module) -> bool:
    """``compile=None`` means: compile when the model's parameters live on CUDA."""
    if compile is None:
        first = next(model.parameters(), None)
        return bool(first is not None and first.is_cuda)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True, False or None (auto: CUDA only), got {compile!r}")
    return compile
