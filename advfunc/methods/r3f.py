"""R3F: noise on the embeddings and a symmetric-KL consistency term (Aghajanyan et al., 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.arguments import require_positive
from advfunc.divergence import logits_of, symmetric_kl
from advfunc.forward import LossFn, PerturbedModel
from advfunc.noise import gaussian, require_generator, uniform
from advfunc.objective import fresh_leaves, gradient
from advfunc.step import Grads, Step, StepOutput, as_scale, check_hook_fired, prepare
from advfunc.targets import EmbeddingOutput, resolve_target

NOISES = ("uniform", "normal")


def r3f(
    model: nn.Module,
    sigma: float = 1e-5,
    lambda_: float = 1.0,
    noise: str = "uniform",
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
) -> Step:
    """R3F: train on the task loss plus λ · sKL between a clean and a noised forward.

    .. math::
        z \\sim U(−σ, σ) \\text{ or } N(0, σ^2 I),\\quad
        \\text{grads} = ∇_θ\\big[L(θ) + λ · \\mathrm{sKL}(f(x;θ), f(x + z;θ))\\big]

    f gives logits, sKL(p, q) = KL(p‖q) + KL(q‖p) averaged over the batch, x is the
    input-embedding output [B, L, H] and z [B, L, H] is zero at padding. There is no
    ascent step; the gradient flows through both forwards (fairseq's R3F). ``noise`` is
    ``"uniform"`` (fairseq's default) or ``"normal"``; z comes from ``generator``
    (overridable per call: ``step(params, batch, generator=g)``).

    ``out``: ``loss`` the task loss, ``adv_loss`` sKL (before λ), ``delta`` z.

    Cost: 2 forward passes and one backward through both (2 forward+backward passes of
    compute). Eager only (no ``compile``).

    Paper: Aghajanyan et al., "Better Fine-Tuning by Reducing Representational Collapse",
    ICLR 2021.

    Example::

        r3f_step = advfunc.r3f(model, sigma=1e-5, lambda_=1.0, noise="uniform")
        grads, out = r3f_step(advfunc.params_of(model), batch)
    """
    sigma = require_positive("sigma", sigma)
    lambda_ = require_positive("lambda_", lambda_)
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    default_generator = require_generator(generator)
    chosen = resolve_target(model, "embeds", allowed=("embeds",))
    assert isinstance(chosen, EmbeddingOutput)
    perturbed = PerturbedModel(model, loss_fn, autocast)
    draw = uniform if noise == "uniform" else gaussian

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch)
        scale = as_scale(loss_scale, call.device)
        draw_from = require_generator(generator) if generator is not None else default_generator
        leaves = fresh_leaves(call.params, call.trainable)
        live = {**call.params, **leaves}
        with perturbed.hooked() as calls:
            task_loss, clean_outputs = perturbed.loss(live, call.kwargs, None)
            clean = logits_of(clean_outputs)  # [B, C]
            z = draw(call.layout, sigma, chosen.dtype, call.device, draw_from)  # [B, L, H]
            noised = perturbed.outputs(live, call.kwargs, chosen.offset({"embeds": z}, call.layout))
            check_hook_fired(calls)
            consistency = symmetric_kl(clean, logits_of(noised))
            grads = gradient((task_loss + lambda_ * consistency) * scale, leaves)
        out = StepOutput(
            loss=task_loss.detach(),
            adv_loss=consistency.detach(),
            delta=z,
            skipped=torch.zeros((), dtype=torch.bool, device=call.device),
            logits=clean.detach(),
        )
        return grads, out

    config = {"sigma": sigma, "lambda_": lambda_, "noise": noise, "target": "embeds", "forward_only_passes": 0}
    return Step("r3f", 2, config, step)
