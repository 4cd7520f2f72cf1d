"""VAT: virtual adversarial training on the embedding output (Miyato et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.arguments import require_positive, require_steps
from advfunc.divergence import kl_logits, logits_of
from advfunc.forward import LossFn, PerturbedModel
from advfunc.noise import gaussian, require_generator
from advfunc.norms import l2_direction
from advfunc.objective import fresh_leaves, frozen, gradient
from advfunc.step import Grads, Step, StepOutput, as_scale, check_hook_fired, prepare
from advfunc.targets import EmbeddingOutput, resolve_target


def vat(
    model: nn.Module,
    epsilon: float = 1.0,
    xi: float = 0.1,
    alpha: float = 1.0,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
) -> Step:
    """Virtual Adversarial Training, the text version: a power-iteration direction on the embeddings.

    .. math::
        p = \\operatorname{sg}\\,p(y|x;θ),\\quad d_0 \\sim N(0, I),\\quad
        d_k = ∇_r \\mathrm{KL}\\big(p ‖ p(y|x + r;θ)\\big)\\big|_{r = ξ d_{k-1}/‖d_{k-1}‖₂},\\\\
        r_{vadv} = ε · d_K / ‖d_K‖₂,\\quad
        \\text{grads} = ∇_θ\\big[L(θ) + α · \\mathrm{KL}(p ‖ p(y|x + r_{vadv};θ))\\big]

    x is the input-embedding output [B, L, H]; ‖·‖₂ is per example over (seq, hidden) with
    padding excluded (d is masked). p is held fixed (stop-gradient) and so is r_vadv.
    The KL is averaged over the batch (:func:`advfunc.divergence.kl_logits`). On a batch
    without ``labels`` (and no ``loss_fn``) L is dropped: the grads are those of the
    virtual adversarial term alone and ``out.loss`` is NaN.

    ξ must be large enough that p(y|x + r) differs from p(y|x) in the model's precision
    (ξ ≈ 0.1 per example in float32): an example whose KL gradient rounds to exactly 0
    gets r_vadv = 0.

    ``out``: ``loss`` the supervised loss, ``adv_loss`` the KL at r_vadv (before α),
    ``delta`` r_vadv [B, L, H], ``logits`` the clean logits. d₀ is drawn from ``generator``
    (overridable per call: ``step(params, batch, generator=g)``), the global RNG when None.

    Cost: K + 2 forward+backward passes (K = ``power_iters``): the clean pass, K passes
    that differentiate r only, one full pass at r_vadv. Without labels the clean pass is
    a forward only. Eager only (no ``compile``).

    Paper: Miyato, Dai & Goodfellow, "Adversarial Training Methods for Semi-Supervised
    Text Classification", ICLR 2017; the method: Miyato et al., "Virtual Adversarial
    Training", TPAMI 2018.

    Example::

        vat_step = advfunc.vat(model, epsilon=1.0, xi=0.1, alpha=1.0)
        grads, out = vat_step(params, unlabelled_batch)   # no "labels": the VAT term alone
    """
    epsilon = require_positive("epsilon", epsilon)
    xi = require_positive("xi", xi)
    alpha = require_positive("alpha", alpha)
    power_iters = require_steps("power_iters", power_iters)
    default_generator = require_generator(generator)
    chosen = resolve_target(model, "embeds", allowed=("embeds",))
    assert isinstance(chosen, EmbeddingOutput)
    perturbed = PerturbedModel(model, loss_fn, autocast)

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch, needs_loss=False)
        scale = as_scale(loss_scale, call.device)
        draw_from = require_generator(generator) if generator is not None else default_generator
        supervised = loss_fn is not None or call.kwargs.get("labels") is not None
        leaves = fresh_leaves(call.params, call.trainable)
        live = {**call.params, **leaves}
        fixed = frozen(call.params)
        with perturbed.hooked() as calls:
            if supervised:
                clean_loss, clean_outputs = perturbed.loss(live, call.kwargs, None)
            else:
                with torch.no_grad():
                    clean_outputs = perturbed.outputs(fixed, call.kwargs, None)
                clean_loss = torch.full((), float("nan"), device=call.device)
            clean = logits_of(clean_outputs).detach()  # p(y|x), held fixed
            d = gaussian(call.layout, 1.0, chosen.dtype, call.device, draw_from)  # [B, L, H]
            skipped = torch.zeros((), dtype=torch.bool, device=call.device)
            for _ in range(power_iters):
                unit, finite = l2_direction(d, (1, 2))
                skipped = skipped | ~finite
                r = (xi * unit).to(chosen.dtype).requires_grad_(True)  # [B, L, H]
                probe = perturbed.outputs(fixed, call.kwargs, chosen.offset({"embeds": r}, call.layout))
                check_hook_fired(calls)
                # The loss scale keeps an fp16 KL gradient from underflowing; d's
                # direction does not depend on it.
                d = gradient(kl_logits(clean, logits_of(probe)) * scale, {"r": r})["r"]
            unit, finite = l2_direction(d, (1, 2))
            skipped = skipped | ~finite
            r_vadv = torch.where(skipped, torch.zeros_like(unit), epsilon * unit).to(chosen.dtype)  # [B, L, H]
            adversarial = perturbed.outputs(live, call.kwargs, chosen.offset({"embeds": r_vadv}, call.layout))
            vat_loss = kl_logits(clean, logits_of(adversarial))
            objective = alpha * vat_loss + clean_loss if supervised else alpha * vat_loss
            grads = gradient(objective * scale, leaves)
        out = StepOutput(
            loss=clean_loss.detach(),
            adv_loss=vat_loss.detach(),
            delta=r_vadv.detach(),
            skipped=skipped,
            logits=clean,
        )
        return grads, out

    config = {
        "epsilon": epsilon,
        "xi": xi,
        "alpha": alpha,
        "power_iters": power_iters,
        "target": "embeds",
        "forward_only_passes": 0,
    }
    return Step("vat", power_iters + 2, config, step)
