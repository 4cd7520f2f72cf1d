"""SMART training: smoothness-inducing adversarial regularisation with a Bregman proximal step (Jiang et al., 2020)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.attacks.attack import Attack
from advfunc.core.arguments import require_non_negative, require_positive
from advfunc.core.divergence import symmetric_kl
from advfunc.core.model import LossFn, logits_of
from advfunc.core.noise import require_generator
from advfunc.core.objective import Leaves, frozen
from advfunc.core.params import Params
from advfunc.core.stateful import State, StatefulStep
from advfunc.core.step import Grads, StepOutput, check_hook_fired, prepare
from advfunc.methods.teacher import copy_of_trainable, ema, passing


def smart(
    model: nn.Module,
    epsilon: float = 1e-5,
    step_size: float = 1e-3,
    steps: int = 1,
    noise_var: float = 1e-5,
    lambda_s: float = 1.0,
    mu: float = 1.0,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    *,
    beta: float = 0.99,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> StatefulStep:
    """SMART: task loss + λ_s · adversarial symmetric KL + μ · Bregman proximal term.

    .. math::
        δ_0 = σ · N(0, I),\\quad
        δ_k = Π_ε\\big(δ_{k-1} + η · g_k/‖g_k‖\\big),\\quad
        g_k = ∇_δ \\mathrm{sKL}\\big(\\operatorname{sg} f(x;θ), f(x + δ_{k-1};θ)\\big),\\\\
        \\text{grads} = ∇_θ\\big[L(θ) + λ_s · \\mathrm{sKL}(f(x;θ), f(x + δ_K;θ))
            + μ · \\mathrm{sKL}(f(x;θ), f(x;θ̃))\\big]

    f gives logits, sKL(p, q) = KL(p‖q) + KL(q‖p) averaged over the batch (for a causal
    LM over the completion positions its labels mark, never prompt or padding), x is the
    input-embedding output [B, L, H], δ_K is :func:`advfunc.attacks.smart`. ‖·‖ and Π_ε
    are per token over the hidden axis: L∞ (``norm="linf"``, the paper's) or L2. δ_K is
    held fixed in the final gradient, which flows through both the clean and the
    perturbed outputs (the paper's R_s; the authors' mt-dnn code stops it in the
    reference side of each KL). σ is ``noise_var``:
    as in the authors' code it multiplies a standard normal (the paper's σ = 1e-5).
    θ̃ (the teacher) is an input: ``step(params, batch, teacher)``; update it with
    :func:`advfunc.ema`. Names the teacher lacks take the value in ``params``;
    ``teacher=None`` is allowed only with ``mu=0``, which drops the proximal term.
    The stateful protocol carries θ̃ itself: ``step.init(params)`` copies the trainable
    parameters (θ̃₀ = θ₀), ``step.update(params, batch, state)`` runs the step at the
    state's teacher and ``step.after_update(state, params)`` applies θ̃ ← β θ̃ + (1 − β) θ
    once per optimizer step (β = ``beta``, 0.99 in the paper's §3.2).

    ``out``: ``loss`` the task loss, ``adv_loss`` sKL at δ_K (before λ_s), ``delta`` δ_K
    [B, L, H]. δ₀ comes from ``generator`` (overridable per call).

    Cost: K + 2 forward+backward passes (the clean pass, K ascent passes that
    differentiate δ only, the pass at δ_K; the last two share one backward) plus one
    forward without backward for the teacher when μ > 0. With ``compile`` the K ascent
    passes run as compiled graphs.

    Paper: Jiang et al., "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural
    Language Models through Principled Regularized Optimization", ACL 2020.

    Example::

        smart_step = advfunc.smart(model, epsilon=1e-5, step_size=1e-3, lambda_s=1.0, mu=1.0)
        teacher = advfunc.teacher_of(advfunc.params_of(model))
        grads, out = smart_step(advfunc.params_of(model), batch, teacher)
        advfunc.set_grads(model, grads); optimizer.step()
        teacher = advfunc.ema(teacher, advfunc.params_of(model), beta=0.99)
    """
    lambda_s = require_positive("lambda_s", lambda_s)
    mu = require_non_negative("mu", mu)
    beta = require_fraction("beta", beta)
    rule = (epsilon, step_size, steps, noise_var, norm, generator)
    attack = attacks.smart(model, *rule, loss_fn=loss_fn, autocast=autocast, compile=compile)
    smoothed = _Smoothed(model, attack, lambda_s, mu, beta)
    config = {**attack.config, "lambda_s": lambda_s, "mu": mu, "beta": beta, "forward_only_passes": 1 if mu > 0 else 0}
    start, carry = copy_of_trainable(model, "teacher"), passing("teacher")
    return StatefulStep("smart", steps + 2, config, smoothed.step, start=start, carry=carry, advance=smoothed.advance)


@dataclasses.dataclass(frozen=True)
class _Smoothed:
    """SMART bound to a model: the step at a teacher, and the teacher's EMA after an optimizer step."""

    model: nn.Module
    attack: Attack
    lambda_s: float
    mu: float
    beta: float

    def step(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        teacher: Mapping[str, torch.Tensor] | None,
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        attack, perturbed = self.attack, self.attack.perturbed
        call = prepare(self.model, perturbed, attack.target, params, batch, loss_scale)
        theta_tilde = teacher_params(teacher, call.params, self.mu)
        draw_from = None if generator is None else require_generator(generator)
        with perturbed.hooked(count=not attack.compiled) as calls:
            leaves = Leaves(attack.engine, call)
            task_loss, clean_outputs = perturbed.loss(leaves.params, call.kwargs, leaves.probe())
            clean = logits_of(clean_outputs)  # [B, C], carries θ's graph into the final backward
            reference = clean.detach()
            delta, skipped = attack.run(call, generator=draw_from, reference=reference)  # [B, L, H]
            check_hook_fired(calls, attack.target)
            adversarial = attack.engine.outputs(leaves.params, call.kwargs, call.layout, delta, leaves.probe())
            positions = perturbed.counted_positions(call.kwargs, clean)  # a causal LM: completion only
            smoothness = symmetric_kl(clean, logits_of(adversarial), positions)
            objective = task_loss + self.lambda_s * smoothness
            if theta_tilde is not None:
                with torch.no_grad():
                    anchor = logits_of(perturbed.outputs(theta_tilde, call.kwargs, None))
                objective = objective + self.mu * symmetric_kl(clean, anchor, positions)
            grads = leaves.gradient(objective * call.scale)
        out = StepOutput(
            loss=task_loss.detach(),
            adv_loss=smoothness.detach(),
            delta=delta["embeds"].detach(),
            skipped=skipped,
            logits=reference,
        )
        return grads, out

    def advance(self, state: State, params: Mapping[str, torch.Tensor]) -> State:
        return {**state, "teacher": ema(state["teacher"], params, self.beta)}


def require_fraction(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a finite number in [0, 1] (SMART's teacher decay, 0.99), got {value!r}")
    return float(value)


def teacher_params(teacher: Any, params: Params, mu: float) -> Params | None:
    """θ̃ as a full params dict (names it lacks from ``params``), or None when μ = 0.

    Also the reference parameters of LAT's KL retain term (μ > 0 there whenever given).
    """
    if teacher is None:
        if mu > 0:
            raise ValueError(
                "teacher is None but mu > 0: pass the teacher parameters θ̃ "
                "(advfunc.teacher_of(params) to start, advfunc.ema to update), or build the step with mu=0"
            )
        return None
    if not isinstance(teacher, Mapping):
        raise TypeError(f"teacher must be a mapping name -> tensor (advfunc.teacher_of), got {type(teacher).__name__}")
    unknown = sorted(set(teacher) - set(params))
    if unknown:
        raise ValueError(f"teacher has names the model does not: {unknown[:5]}; build it with advfunc.teacher_of")
    for name, value in teacher.items():
        if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"teacher[{name!r}] is {shape}, the model's parameter has shape {tuple(params[name].shape)}"
            )
    if mu == 0:
        return None
    return {**frozen(params), **frozen(teacher)}
