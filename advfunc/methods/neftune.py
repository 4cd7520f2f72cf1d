"""NEFTune training: fine-tune on noised embeddings (Jain et al., 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.engine import Engine, resolve_compile
from advfunc.core.model import LossFn
from advfunc.core.noise import require_generator
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired, prepare, report


def neftune(
    model: nn.Module,
    alpha: float = 5.0,
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """NEFTune: the training loss at noised input embeddings, nothing else.

    .. math::
        \\text{grads} = ∇_θ L(θ, z),\\quad z_{b,i} = \\frac{α}{\\sqrt{n_{b,i} · d}} · u_{b,i},\\quad
        u_{b,i} \\sim U(−1, 1)^d

    z is :func:`advfunc.attacks.neftune`: n_{b,i} counts the real tokens of the sequence
    token i belongs to (each packed sequence its own when ``position_ids`` restart at 0),
    d is the embedding width; z is zero at padding. With completion-only labels (prompt
    positions −100) L is the model's loss over the completion. ``out.loss`` and
    ``out.adv_loss`` are both L(θ, z), ``out.delta`` z. z comes from ``generator``
    (overridable per call: ``step(params, batch, generator=g)``).

    Cost: 1 forward+backward pass (``compile`` compiles it). Paper: Jain et al., "NEFTune:
    Noisy Embeddings Improve Instruction Finetuning", 2023 (ICLR 2024); α = 5 is among
    the paper's values (5, 10, 15).

    Example::

        step = advfunc.neftune(model, alpha=5.0)
        grads, out = step(advfunc.params_of(model), batch)
    """
    attack = attacks.neftune(model, alpha, generator, loss_fn=loss_fn, autocast=autocast)
    engine = Engine(attack.perturbed, attack.target, resolve_compile(compile, model))  # the one full pass

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, attack.perturbed, attack.target, params, batch, loss_scale)
        draw_from = None if generator is None else require_generator(generator)
        with attack.perturbed.hooked(count=not engine.compiled) as calls:
            noise, skipped = attack.run(call, generator=draw_from)
            at = engine.full(call, noise, with_delta_grad=False)
            check_hook_fired(calls, attack.target)
        return at.param_grads, report(attack.target, call.layout, noise, at.loss, at.loss, skipped, at.logits)

    return Step("neftune", 1, {**attack.config, "forward_only_passes": 0}, step)
