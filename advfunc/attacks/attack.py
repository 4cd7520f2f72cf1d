"""The attack protocol: a perturbation rule, bound to a model, as a pure function that returns δ.

A :class:`Rule` is three pure functions and a count, in the manner of an optax
``GradientTransformation``: ``init`` draws δ₀, ``ascend`` takes δ and the gradient of the
attack's objective at δ and returns the next δ, ``finish`` maps the last iterate to the
attack's output. An :class:`Attack` runs the rule's loop on a model::

    δ₀ = init(call, generator)                   # or the caller's start
    δ_t = ascend(δ_{t-1}, ∇_δ objective(θ, δ_{t-1}), params, layout),   t = 1..steps
    δ = finish(δ_steps)

Each gradient is a pass that differentiates δ only; the first one is the caller's
``grads`` when the rule starts from δ = 0 and the caller already has it (a training step
gets it from its clean pass). With ``compile`` each inner step — the δ-only pass and the
ascent — runs as one ``torch.compile(fullgraph=True)`` graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from advfunc.core.engine import Divergence, Engine, compile_pass, resolve_compile
from advfunc.core.model import LossFn, PerturbedModel, logits_of
from advfunc.core.noise import require_generator
from advfunc.core.objective import frozen
from advfunc.core.params import Params
from advfunc.core.prefix import PrefixCache
from advfunc.core.step import Call, check_hook_fired, drop_if_skipped, prepare
from advfunc.core.targets import Delta, Layout, PublicDelta, Target

Init = Callable[[Call, "torch.Generator | None"], Delta]
Ascend = Callable[[Delta, Delta, Params, Layout], tuple[Delta, torch.Tensor]]


class Rule(NamedTuple):
    """A perturbation rule: δ₀ = init(call, generator), δ_t = ascend(δ_{t-1}, g_t, ...), δ = finish(δ_steps).

    ``ascend`` also returns a 0-dim bool that is false when its gradient was not finite
    (the attack then returns δ = 0). ``reads_grads``: the first ascent uses the gradient
    at δ = 0, so a caller's ``grads`` replace the first δ-only pass; a rule that starts
    elsewhere (a random δ₀) or whose objective is flat at δ = 0 (a divergence from the
    clean prediction) never reads them.
    """

    init: Init
    ascend: Ascend
    steps: int
    reads_grads: bool = True
    finish: Callable[[Delta], Delta] | None = None


def zero_init(target: Target) -> Init:
    """δ₀ = 0 in the target's shape."""

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        return call.zeros(target)

    return init


class Attack:
    """A :class:`Rule` bound to a model: ``delta = attack(params, batch, grads=None)``.

    Pure: params, batch, the model and its mode are untouched. ``grads`` is the gradient
    of the attack's objective with respect to the perturbation at δ = 0 (for
    ``target="weight"`` the batch's [B·L, H] rows of the embedding-matrix gradient), in the
    target's public form; without it the attack computes it with one δ-only pass. Both
    give the same δ. ``start=`` begins from a given δ instead of δ₀ (then ``grads``, if
    given, must be the gradient at ``start``); ``generator=`` overrides the factory's
    generator for a rule that draws; ``loss_scale=`` scales the objective of every δ-only
    pass (fp16), which no ascent direction depends on.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        target: Target,
        rule: Rule,
        config: Mapping[str, Any],
        *,
        loss_fn: LossFn | None = None,
        autocast: torch.dtype | None = None,
        compile: bool | None = None,
        divergence: Divergence | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.target = target
        self.rule = rule
        self.config = dict(config)
        self.generator = require_generator(generator)
        self.perturbed = PerturbedModel(model, loss_fn, autocast, target.modules)
        self.engine = Engine(self.perturbed, target, resolve_compile(compile, model), divergence)
        self._inner = compile_pass(self._inner_step) if self.engine.compiled else self._inner_step

    @property
    def compiled(self) -> bool:
        return self.engine.compiled

    def _inner_step(
        self,
        params: Params,
        kwargs: Mapping[str, Any],
        layout: Layout,
        delta: Delta,
        scale: torch.Tensor,
        reference: torch.Tensor | None,
        prefix: PrefixCache | None,
    ) -> tuple[Delta, torch.Tensor]:
        grads = self.engine.delta_only(params, kwargs, layout, delta, scale, reference, prefix)
        return self.rule.ascend(delta, grads, params, layout)

    def run(
        self,
        call: Call,
        grads: Delta | None = None,
        *,
        start: Delta | None = None,
        generator: torch.Generator | None = None,
        reference: torch.Tensor | None = None,
    ) -> tuple[Delta, torch.Tensor]:
        """(δ, skipped) for a prepared call, inside the model's offset hook.

        This is the loop every method shares: a step passes the δ-gradient of its clean
        pass as ``grads`` and, for a divergence rule, its clean logits as ``reference``.
        """
        draw_from = self.generator if generator is None else generator
        delta = self.rule.init(call, draw_from) if start is None else start
        skipped = torch.zeros((), dtype=torch.bool, device=call.device)
        prefix = self.engine.prefix_cache()  # this call's: θ and the batch are fixed for its δ-only passes
        for t in range(self.rule.steps):
            if t == 0 and grads is not None and (self.rule.reads_grads or start is not None):
                delta, finite = self.rule.ascend(delta, grads, call.params, call.layout)
            else:
                delta, finite = self._inner(call.params, call.kwargs, call.layout, delta, call.scale, reference, prefix)
            skipped = skipped | ~finite
        if self.rule.finish is not None:
            delta = self.rule.finish(delta)
        return drop_if_skipped(delta, skipped), skipped

    def reference_logits(self, call: Call) -> torch.Tensor | None:
        """The clean logits a divergence rule compares with (one forward, no graph); None otherwise."""
        if self.engine.divergence is None:
            return None
        with torch.no_grad():
            return logits_of(self.perturbed.outputs(frozen(call.params), call.kwargs, None)).detach()

    def prepare(
        self, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], loss_scale: float | torch.Tensor
    ) -> Call:
        """The checked call whose objective the attack's δ-only passes differentiate."""
        return prepare(
            self.model, self.perturbed, self.target, params, batch, loss_scale, self.engine.divergence is None
        )

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        grads: PublicDelta | None = None,
        *,
        start: PublicDelta | None = None,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> PublicDelta:
        call = self.prepare(params, batch, loss_scale)
        given = None if grads is None else self.target.internal(grads, call.layout, call.params, "grads")
        first = None if start is None else self.target.internal(start, call.layout, call.params, "start")
        if first is not None:
            first = {k: v.detach() for k, v in first.items()}
        with self.perturbed.hooked(count=not self.compiled) as calls:
            reference = self.reference_logits(call)
            delta, _ = self.run(
                call,
                None if given is None else {k: v.detach() for k, v in given.items()},
                start=first,
                generator=None if generator is None else require_generator(generator),
                reference=reference,
            )
            consumed = given is not None and self.rule.steps > 0 and (self.rule.reads_grads or first is not None)
            if self.rule.steps > int(consumed):
                check_hook_fired(calls, self.target)
        return self.target.public({k: v.detach() for k, v in delta.items()})

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"advfunc.attacks.{self.name}({options})"
