"""FreeAT training: "free" adversarial training, one perturbation carried across replays (Shafahi et al., 2019)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.attacks.attack import Attack
from advfunc.core.arguments import require_steps
from advfunc.core.model import LossFn
from advfunc.core.stateful import State, StatefulStep
from advfunc.core.step import Call, Grads, StepOutput, check_hook_fired, drop_if_skipped, prepare, report
from advfunc.core.targets import Delta, Target


def free_at(
    model: nn.Module,
    epsilon: float = 0.01,
    alpha: float | None = None,
    norm: str = "linf",
    *,
    replays: int = 3,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> StatefulStep:
    """Free adversarial training on the embedding output: each replay's gradient also moves δ.

    .. math::
        \\text{grads} = ∇_θ L(θ, δ),\\quad G = ∇_δ L(θ, δ),\\quad
        δ' = Π_ε\\big(δ + α · \\operatorname{sign}(G)\\big)\\ (\\text{linf})\\ \\text{or}\\
             Π_ε\\big(δ + α · G/‖G‖₂\\big)\\ (\\text{l2})

    δ' is :func:`advfunc.attacks.free_at` started at δ with the G this pass already
    holds. Call it as ``step(params, batch, delta)``: ``delta`` is the current
    perturbation [B, L, H] (None: zero, the first replay of a batch) and ``out.delta`` is
    the next replay's δ'. α defaults to ε (Shafahi et al.'s step). Π_ε clamps elementwise
    (linf) or rescales per example over (seq, hidden) (l2); padding positions of δ' are
    zero. ``out.loss`` and ``out.adv_loss`` are both L(θ, δ), the one loss this step
    computes. A non-finite G sets ``out.skipped`` and makes δ' zero.

    The stateful protocol carries δ itself and replays each batch ``replays`` times (m;
    Shafahi et al. use 4–10 on images): ``step.update(params, batch, state)`` starts each
    batch's first replay from δ = 0 and the next ones from the δ' before, and
    ``step.after_update(state, params)`` counts the replays, dropping δ' after the m-th.

    Cost: 1 forward+backward pass per replay (∇_θ and ∇_δ from the same backward).

    Paper: Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019.

    Example (replay each batch m times, an optimizer step between replays)::

        free_step = advfunc.free_at(model, epsilon=0.01)
        for batch in loader:
            delta = None                      # shapes change between text batches
            for _ in range(m):
                grads, out = free_step(advfunc.params_of(model), batch, delta)
                advfunc.set_grads(model, grads)
                optimizer.step()
                delta = out.delta
    """
    replays = require_steps("replays", replays)
    attack = attacks.free_at(model, epsilon, alpha, norm, loss_fn=loss_fn, autocast=autocast, compile=compile)
    free = _Free(model, attack, replays)
    config = {**attack.config, "replays": replays, "forward_only_passes": 0}
    return StatefulStep(
        "free_at",
        1,
        config,
        free.step,
        start=_start,
        carry=_carry,
        advance=free.advance,
        replays=replays,
    )


@dataclasses.dataclass(frozen=True)
class _Free:
    """Free AT bound to a model: one pass at δ that also gives the next replay's δ'."""

    model: nn.Module
    attack: Attack
    replays: int

    def step(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        delta: torch.Tensor | None = None,
        *,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        attack, target = self.attack, self.attack.target
        call = prepare(self.model, attack.perturbed, target, params, batch, loss_scale)
        current = call.zeros(target) if delta is None else _given_delta(delta, call, target)
        with attack.perturbed.hooked(count=not attack.compiled) as calls:
            at = attack.engine.full(call, current, with_delta_grad=True)
            check_hook_fired(calls, target)
            following, skipped = attack.run(call, at.delta_grads, start=current)
        following = drop_if_skipped(following, skipped)
        return at.param_grads, report(target, call.layout, following, at.loss, at.loss, skipped, at.logits)

    def advance(self, state: State, params: Mapping[str, torch.Tensor]) -> State:
        replay = (state["replay"] + 1) % self.replays
        return {"delta": state["delta"] if replay else None, "replay": replay}


def _given_delta(delta: Any, call: Call, target: Target) -> Delta:
    """The caller's δ [B, L, H] checked against this batch, as the target's δ."""
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta must be a [batch, seq, hidden] tensor (a previous out.delta) or None, got {delta!r}")
    if tuple(delta.shape) != tuple(call.layout.shape):
        raise ValueError(
            f"delta has shape {tuple(delta.shape)} but this batch needs {tuple(call.layout.shape)}; "
            "pass delta=None to start a new batch's perturbation"
        )
    return {"embeds": delta.detach().to(dtype=target.dtype, device=call.device)}  # type: ignore[attr-defined]


def _start(params: Mapping[str, torch.Tensor]) -> State:
    return {"delta": None, "replay": 0}


def _carry(
    step: StatefulStep, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], state: State
) -> tuple[Grads, StepOutput, State]:
    grads, out = step(params, batch, state["delta"])
    return grads, out, {**state, "delta": out.delta}
