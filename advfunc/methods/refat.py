"""ReFAT: training to refuse while the refusal direction is ablated from the residual stream (Yu et al., 2025)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from advfunc.core.arguments import require_steps
from advfunc.core.model import LossFn, PerturbedModel
from advfunc.core.noise import require_generator
from advfunc.core.params import params_of
from advfunc.core.stateful import State, StatefulStep
from advfunc.core.step import Grads, StepOutput, prepare
from advfunc.core.targets import ModuleOutput
from advfunc.methods.residual import captured, edited, harmful_rows, last_real_token, layer_target
from advfunc.methods.teacher import passing

Direction = dict[str, torch.Tensor]  # {layer name: r [H]}, float32


def refat(
    model: nn.Module,
    layers: str | Sequence[str] | None = None,
    p: float = 0.5,
    every: int = 8,
    generator: torch.Generator | None = None,
    *,
    harmful: Mapping[str, torch.Tensor],
    harmless: Mapping[str, torch.Tensor],
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
) -> StatefulStep:
    """Refusal Feature Adversarial Training of a causal LM: ``step(params, batch, direction=None)``.

    .. math::
        r^{(l)} = \\operatorname{mean}_{x \\in D_{harmful}} h^{(l)}_{-1}(x)
            − \\operatorname{mean}_{x \\in D_{harmless}} h^{(l)}_{-1}(x),\\qquad
        \\hat r^{(l)} = r^{(l)}/‖r^{(l)}‖₂,\\\\
        h^{(l)} ← h^{(l)} − \\hat r^{(l)} \\hat r^{(l)\\top} h^{(l)}
            \\ \\text{(rows with } a_b = 1\\text{)},\\quad
        a_b \\sim \\text{Bernoulli}(p)\\ \\text{on harmful rows, } 0 \\text{ elsewhere},\\qquad
        \\text{grads} = ∇_θ L(θ;\\, x, y \\mid \\text{ablation})

    h^{(l)} [B, L, H] is the residual stream each module of ``layers`` returns
    (``"model.layers.4"``, or several names; None: the middle decoder layer), h_{-1}
    its value at a prompt's last real token. The refusal direction r is the difference
    of means over two prompt sets the caller gives, ``harmful`` and ``harmless``
    (mappings with ``input_ids`` [N, L] and optionally ``attention_mask``). Refusal
    feature ablation (RFA) removes the component along r̂ at every token of the rows it
    picks: each row flagged in ``batch["harmful"]`` ([B] bool, consumed by advfunc) is
    picked with probability ``p``, drawn as ``torch.rand(B, generator=generator) < p``.
    The loss L is the model's (``labels``: the refusal on harmful rows, the ordinary
    answer on harmless ones), so the model learns to refuse without the feature an
    attack would remove; there is no inner attack loop.

    The direction is state: ``step(params, batch, direction)`` takes it (``{layer: r [H]}``;
    None: computed at ``params`` first); through the stateful protocol ``step.init``
    computes r and ``step.after_update`` recomputes it every ``every`` optimizer steps.

    ``out``: ``loss`` and ``adv_loss`` L under the ablation, ``delta`` the unit
    directions r̂ used (one [H] tensor for one layer, a dict for several), ``logits`` the
    pass's logits.

    Cost: 1 forward+backward pass per step; 2 forward-only passes (one per prompt set)
    each time r is computed: at ``init``, then once per ``every`` steps (and on every
    call that gives no direction).

    Paper: Yu et al., "Robust LLM safeguarding via refusal feature adversarial
    training", ICLR 2025; the direction: Arditi et al., "Refusal in Language Models Is
    Mediated by a Single Direction", NeurIPS 2024.

    Example::

        step = advfunc.refat(model, layers="model.layers.4", harmful=bad_prompts, harmless=good_prompts)
        state = step.init(params)
        grads, out, state = step.update(params, {**batch, "harmful": rows_flag}, state)
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and 0 <= p <= 1):
        raise ValueError(f"p must be a probability in [0, 1] (the chance that a harmful row is ablated), got {p!r}")
    every = require_steps("every", every)
    default_generator = require_generator(generator)
    target = layer_target(model, layers)
    perturbed = PerturbedModel(model, loss_fn, autocast)
    prompts = {
        "harmful": _prompt_set(perturbed, harmful, "harmful"),
        "harmless": _prompt_set(perturbed, harmless, "harmless"),
    }
    ablation = _Ablation(model, target, perturbed, prompts, float(p), every, default_generator)
    # forward_only_passes counts per step; the direction's two forwards come once per ``every`` steps.
    config = {"layers": list(target.module_names), "p": float(p), "every": every, "forward_only_passes": 0}
    return StatefulStep(
        "refat",
        1,
        {**config, "direction_passes": 2},
        ablation.step,
        start=ablation.start,
        carry=passing("direction"),
        advance=ablation.advance,
    )


@dataclasses.dataclass(frozen=True)
class _Ablation:
    """ReFAT bound to a model: the refusal direction at given params, and the step under its ablation."""

    model: nn.Module
    target: ModuleOutput
    perturbed: PerturbedModel
    prompt_sets: Mapping[str, dict[str, Any]]  # "harmful" / "harmless": the model's kwargs
    p: float
    every: int
    generator: torch.Generator | None

    def direction(self, params: Mapping[str, torch.Tensor]) -> Direction:
        """{layer: r [H]}: the difference of the two prompt sets' mean last-token states (2 forwards)."""
        full = {**params_of(self.model), **{name: value.detach() for name, value in params.items()}}
        names = self.target.module_names
        means = {}
        for which, kwargs in self.prompt_sets.items():
            with torch.no_grad(), captured(self.target) as hidden:
                self.perturbed.outputs(full, kwargs, None)
            mask = kwargs.get("attention_mask")
            means[which] = {name: last_real_token(hidden[name], mask).float().mean(0) for name in names}
        return {name: means["harmful"][name] - means["harmless"][name] for name in names}

    def step(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        direction: Mapping[str, torch.Tensor] | None = None,
        *,
        loss_scale: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Grads, StepOutput]:
        flagged, rest = harmful_rows(batch, "refat")
        call = prepare(self.model, self.perturbed, self.target, params, rest, loss_scale)
        given = self.direction(call.params) if direction is None else direction
        unit = _unit(given, self.target.module_names, call.device)
        draw_from = self.generator if generator is None else require_generator(generator)
        drawn = torch.rand(flagged.shape[0], generator=draw_from, device=call.device) < self.p
        ablate = (flagged.to(call.device) & drawn).to(torch.float32)[:, None, None]  # [B, 1, 1]

        def remove_direction(name: str, hidden: torch.Tensor) -> torch.Tensor:
            along = (hidden.float() @ unit[name])[..., None] * unit[name]  # [B, L, H]: the component along r̂
            return (hidden.float() - ablate * along).to(hidden.dtype)

        leaves = {n: call.params[n].detach().requires_grad_(True) for n in call.trainable}
        with edited(self.target, remove_direction):
            loss, outputs = self.perturbed.loss({**call.params, **leaves}, call.kwargs, None)
        found = torch.autograd.grad(loss * call.scale, list(leaves.values()), allow_unused=True, materialize_grads=True)
        logits = getattr(outputs, "logits", None)
        out = StepOutput(
            loss=loss.detach(),
            adv_loss=loss.detach(),
            delta=self.target.public(dict(unit)),
            skipped=torch.zeros((), dtype=torch.bool, device=call.device),
            logits=logits.detach() if isinstance(logits, torch.Tensor) else None,
        )
        return dict(zip(leaves, found, strict=True)), out

    def start(self, params: Mapping[str, torch.Tensor]) -> State:
        return {"direction": self.direction(params), "since": 0}

    def advance(self, state: State, params: Mapping[str, torch.Tensor]) -> State:
        since = state["since"] + 1
        if since < self.every:
            return {**state, "since": since}
        return {"direction": self.direction(params), "since": 0}


def _prompt_set(perturbed: PerturbedModel, prompts: Mapping[str, torch.Tensor], which: str) -> dict[str, Any]:
    """The model's kwargs for one prompt set, checked now: ``input_ids`` [N, L], an optional mask, no labels; moved
    once to the model's device (a Trainer places the model after the prompts were built)."""
    if not isinstance(prompts, Mapping):
        raise TypeError(
            f"{which} must be a mapping with the prompts' input_ids [N, L] (and attention_mask), "
            f"got {type(prompts).__name__}"
        )
    device = next(perturbed.model.parameters()).device
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompts.items() if k != "labels"}
    return perturbed.check_batch(kwargs, needs_loss=False)


def _unit(direction: Mapping[str, torch.Tensor], names: Sequence[str], device: torch.device) -> Direction:
    """r̂ = r/‖r‖₂ per layer, checked against the layers; a zero r gives r̂ = 0, which ablates nothing."""
    if not isinstance(direction, Mapping) or sorted(direction) != sorted(names):
        got = sorted(direction) if isinstance(direction, Mapping) else type(direction).__name__
        raise ValueError(f"direction must be a dict {{layer: r [hidden]}} over the layers {list(names)}, got {got}")
    unit = {}
    for name in names:
        r = direction[name]
        if not isinstance(r, torch.Tensor) or r.dim() != 1:
            raise ValueError(f"direction[{name!r}] must be a [hidden] tensor, got {getattr(r, 'shape', type(r))}")
        r = r.detach().to(device=device, dtype=torch.float32)
        length = torch.linalg.vector_norm(r)
        unit[name] = r / length.clamp(min=torch.finfo(torch.float32).tiny)
    return unit
