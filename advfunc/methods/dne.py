"""DNE training: the clean loss plus the losses at Dirichlet points of the synonym hulls (Zhou et al., 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.attacks.synonyms import SynonymEmbeddings, SynonymTable, add_hull_rows
from advfunc.core.model import LossFn
from advfunc.core.noise import require_generator
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired, drop_if_skipped, prepare, report


def dne(
    model: nn.Module,
    synonyms: SynonymTable,
    steps: int = 3,
    step_size: float = 1.0,
    alpha: float = 1.0,
    decay: float = 0.5,
    width: int = 32,
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """DNE: the clean loss plus the loss at K points of the synonym hulls, each an ascent step from the last.

    .. math::
        \\text{grads} = ∇_θ L(θ, 0) + \\sum_{t=1}^{K} ∇_θ L(θ, δ_{t-1})

    δ₀..δ_K are the iterates of :func:`advfunc.attacks.dne`: δ₀ a Dirichlet draw over each
    token's neighbourhood (the token and its synonyms at concentration ``alpha``, their
    synonyms at ``alpha · decay``, ``width`` columns), then projected ascent of the
    weights on the simplex. Each of the K adversarial passes gives both ∇_θ (added to the
    grads, as the TextDefender reference sums its adversarial losses) and ∇_δ (the next
    ascent), so the attack costs no pass of its own. Each pass differentiates the
    paper's forward Σ_j w_j e(n_j) with w held fixed: the embedding matrix's gradient
    reaches every neighbour's row, weighted by w (:func:`add_hull_rows`, from that
    pass's ∇_δ at no extra pass). ``out.loss`` is the clean loss,
    ``adv_loss`` the last adversarial loss, ``delta`` δ_K. A step may override the
    generator: ``step(params, batch, generator=g)``.

    Cost: 1 + K forward+backward passes. Paper: Zhou, Zheng, Hsieh, Chang & Huang,
    "Defense against Synonym Substitution-based Adversarial Attacks via Dirichlet
    Neighborhood Ensemble", ACL 2021.
    """
    attack = attacks.dne(
        model, synonyms, steps, step_size, alpha, decay, width, generator,
        loss_fn=loss_fn, autocast=autocast, compile=compile,
    )  # fmt: skip
    engine, target, rule = attack.engine, attack.target, attack.rule
    assert isinstance(target, SynonymEmbeddings)  # the synonym attacks' own target: W by name
    weight = target.weight_name

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, attack.perturbed, target, params, batch, loss_scale)
        draw_from = attack.generator if generator is None else require_generator(generator)
        skipped = torch.zeros((), dtype=torch.bool, device=call.device)
        with attack.perturbed.hooked(count=not attack.compiled) as calls:
            # final=False: the embedding gradient stays [B, L, H] until the last pass.
            clean = engine.full(call, call.zeros(target), with_delta_grad=False, final=False)
            check_hook_fired(calls, target)
            total = clean.param_grads
            delta = rule.init(call, draw_from)
            passes = []  # (w, ∂L/∂δ) of each pass: W's rows get their share once W's gradient is whole
            for t in range(steps):
                at = engine.full(call, delta, with_delta_grad=True, accumulate_into=total, final=t == steps - 1)
                total = at.param_grads
                passes.append((delta["weights"], at.delta_grads["embeds"]))
                delta, finite = rule.ascend(delta, at.delta_grads, call.params, call.layout)
                skipped = skipped | ~finite
        if weight in total:  # the paper's forward Σ_j w_j e(n_j): every neighbour's row of W, by w
            for weights, at_delta in passes:
                add_hull_rows(total[weight], weights, at_delta, call.layout)
        assert rule.finish is not None
        final = drop_if_skipped(rule.finish(delta), skipped)
        return total, report(target, call.layout, final, clean.loss, at.loss, skipped, clean.logits)

    return Step("dne", 1 + steps, {**attack.config, "forward_only_passes": 0}, step)
