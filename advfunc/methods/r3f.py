"""R3F training: noise on the embeddings and a symmetric-KL consistency term (Aghajanyan et al., 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.arguments import require_positive
from advfunc.core.divergence import symmetric_kl
from advfunc.core.model import LossFn, logits_of
from advfunc.core.noise import require_generator
from advfunc.core.objective import Leaves
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired, prepare


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

    f gives logits, sKL(p, q) = KL(p‖q) + KL(q‖p) averaged over the batch (for a causal
    LM over the completion positions its labels mark, never prompt or padding), x is the
    input-embedding output [B, L, H] and z [B, L, H] (:func:`advfunc.attacks.r3f`) is
    zero at padding. There is no
    ascent step; the gradient flows through both forwards (fairseq's R3F). ``noise`` is
    ``"uniform"`` (fairseq's default) or ``"normal"``; z comes from ``generator``
    (overridable per call: ``step(params, batch, generator=g)``).

    ``out``: ``loss`` the task loss, ``adv_loss`` sKL (before λ), ``delta`` z.

    Cost: 2 forward passes and one backward through both (2 forward+backward passes of
    compute). Eager only: there is no δ-only pass to compile.

    Paper: Aghajanyan et al., "Better Fine-Tuning by Reducing Representational Collapse",
    ICLR 2021.

    Example::

        r3f_step = advfunc.r3f(model, sigma=1e-5, lambda_=1.0, noise="uniform")
        grads, out = r3f_step(advfunc.params_of(model), batch)
    """
    lambda_ = require_positive("lambda_", lambda_)
    attack = attacks.r3f(model, sigma, noise, generator, loss_fn=loss_fn, autocast=autocast)
    engine, target, perturbed = attack.engine, attack.target, attack.perturbed

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        generator: torch.Generator | None = None,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, target, params, batch, loss_scale)
        draw_from = None if generator is None else require_generator(generator)
        with perturbed.hooked() as calls:
            leaves = Leaves(engine, call)
            task_loss, clean_outputs = perturbed.loss(leaves.params, call.kwargs, leaves.probe())
            clean = logits_of(clean_outputs)  # [B, C]
            z, skipped = attack.run(call, generator=draw_from)  # [B, L, H]
            noised = engine.outputs(leaves.params, call.kwargs, call.layout, z, leaves.probe())
            check_hook_fired(calls, target)
            positions = perturbed.counted_positions(call.kwargs, clean)  # a causal LM: completion only
            consistency = symmetric_kl(clean, logits_of(noised), positions)
            grads = leaves.gradient((task_loss + lambda_ * consistency) * call.scale)
        out = StepOutput(
            loss=task_loss.detach(),
            adv_loss=consistency.detach(),
            delta=z["embeds"],
            skipped=skipped,
            logits=clean.detach(),
        )
        return grads, out

    config = {**attack.config, "lambda_": lambda_, "forward_only_passes": 0}
    return Step("r3f", 2, config, step)
