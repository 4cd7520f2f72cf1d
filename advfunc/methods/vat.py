"""VAT training: virtual adversarial training on the embedding output (Miyato et al., 2017)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.attacks.attack import Attack
from advfunc.core.arguments import require_positive
from advfunc.core.model import LossFn, logits_of
from advfunc.core.noise import require_generator
from advfunc.core.objective import frozen
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired, prepare


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
    compile: bool | None = None,
) -> Step:
    """Virtual Adversarial Training, the text version: a power-iteration direction on the embeddings.

    .. math::
        p = \\operatorname{sg}\\,p(y|x;θ),\\quad d_0 \\sim N(0, I),\\quad
        d_k = ∇_r \\mathrm{KL}\\big(p ‖ p(y|x + r;θ)\\big)\\big|_{r = ξ d_{k-1}/‖d_{k-1}‖₂},\\\\
        r_{vadv} = ε · d_K / ‖d_K‖₂,\\quad
        \\text{grads} = ∇_θ\\big[L(θ) + α · \\mathrm{KL}(p ‖ p(y|x + r_{vadv};θ))\\big]

    x is the input-embedding output [B, L, H]; ‖·‖₂ is per example over (seq, hidden) with
    padding excluded (d is masked); r_vadv is :func:`advfunc.attacks.vat`. p is held
    fixed (stop-gradient) and so is r_vadv.
    The KL is averaged over the batch (:func:`advfunc.kl_logits`); for a causal LM over
    the completion positions its labels mark (every real token without labels), never
    prompt or padding. On a batch
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
    a forward only. The clean pass's backward runs before the power iteration (p is fixed,
    so ∇_θ L and ∇_θ KL are separate backwards) and the full pass at r_vadv adds into its
    buffers: at most one model graph and one gradient dict are alive at a time. With
    ``compile`` every pass runs as a compiled graph.

    Paper: Miyato, Dai & Goodfellow, "Adversarial Training Methods for Semi-Supervised
    Text Classification", ICLR 2017; the method: Miyato et al., "Virtual Adversarial
    Training", TPAMI 2018.

    Example::

        vat_step = advfunc.vat(model, epsilon=1.0, xi=0.1, alpha=1.0)
        grads, out = vat_step(params, unlabelled_batch)   # no "labels": the VAT term alone
    """
    alpha = require_positive("alpha", alpha)
    attack = attacks.vat(
        model, epsilon, xi, power_iters, generator, loss_fn=loss_fn, autocast=autocast, compile=compile
    )
    config = {**attack.config, "alpha": alpha, "forward_only_passes": 0}
    return Step("vat", power_iters + 2, config, _Virtual(model, attack, alpha, loss_fn is not None).step)


@dataclasses.dataclass(frozen=True)
class _Virtual:
    """VAT bound to a model: the clean pass, the power iteration, the pass at r_vadv."""

    model: nn.Module
    attack: Attack
    alpha: float
    own_loss_fn: bool  # a loss_fn gives a supervised loss without labels

    def step(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        attack, engine, target, perturbed = self.attack, self.attack.engine, self.attack.target, self.attack.perturbed
        call = prepare(self.model, perturbed, target, params, batch, loss_scale, needs_loss=False)
        draw_from = None if generator is None else require_generator(generator)
        supervised = self.own_loss_fn or call.kwargs.get("labels") is not None
        with perturbed.hooked(count=not attack.compiled) as calls:
            # p is held fixed, so ∇_θ L and ∇_θ KL are separate backwards: the clean graph is
            # freed before the power iteration, as in the imperative loop.
            if supervised:
                first = engine.full(call, call.zeros(target), with_delta_grad=False, final=False)
                clean_loss, clean, buffers = first.loss, logits_of(first), first.param_grads  # a Pass has .logits
            else:
                with torch.no_grad():
                    clean = logits_of(perturbed.outputs(frozen(call.params), call.kwargs, None)).detach()
                clean_loss, buffers = torch.full((), float("nan"), device=call.device), None
            r_vadv, skipped = attack.run(call, generator=draw_from, reference=clean)  # [B, L, H]
            check_hook_fired(calls, target)
            scale = self.alpha * call.scale
            adversarial = engine.full(
                call, r_vadv, with_delta_grad=False, scale=scale, accumulate_into=buffers, reference=clean
            )
            grads, vat_loss = adversarial.param_grads, adversarial.loss
        out = StepOutput(
            loss=clean_loss.detach(),
            adv_loss=vat_loss.detach(),
            delta=r_vadv["embeds"].detach(),
            skipped=skipped,
            logits=clean,
        )
        return grads, out
