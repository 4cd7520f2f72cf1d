"""FreeAT: "free" adversarial training, one perturbation carried across replays (Shafahi et al., 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.arguments import require_norm, require_positive
from advfunc.engine import Engine, resolve_compile
from advfunc.forward import LossFn, PerturbedModel
from advfunc.norms import l2_direction
from advfunc.projection import project_l2, project_linf
from advfunc.step import Grads, Step, StepOutput, as_scale, check_hook_fired, drop_if_skipped, prepare, report
from advfunc.targets import EmbeddingOutput, Layout, resolve_target


def free_at_ascent(
    delta: torch.Tensor, grad: torch.Tensor, layout: Layout, epsilon: float, alpha: float, norm: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """δ' = Π_ε(δ + α · sign(G)) (linf) or Π_ε(δ + α · G/‖G‖₂) (l2, per example); padding zeroed.

    ``delta``, ``grad``: [B, L, H]. Returns (δ', whether G was finite).
    """
    assert layout.mask is not None
    if norm == "linf":
        finite = torch.isfinite(grad).all()
        direction = torch.where(torch.isfinite(grad), torch.sign(grad), torch.zeros_like(grad)).float()
    else:
        direction, finite = l2_direction(grad, (1, 2))
    moved = ((delta.float() + alpha * direction) * layout.mask).to(delta.dtype)  # [B, L, H]
    projected = project_linf(moved, epsilon) if norm == "linf" else project_l2(moved, epsilon, (1, 2))
    return projected, finite


def free_at(
    model: nn.Module,
    epsilon: float = 0.01,
    alpha: float | None = None,
    norm: str = "linf",
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """Free adversarial training on the embedding output: each replay's gradient also moves δ.

    .. math::
        \\text{grads} = ∇_θ L(θ, δ),\\quad G = ∇_δ L(θ, δ),\\quad
        δ' = Π_ε\\big(δ + α · \\operatorname{sign}(G)\\big)\\ (\\text{linf})\\ \\text{or}\\
             Π_ε\\big(δ + α · G/‖G‖₂\\big)\\ (\\text{l2})

    Call it as ``step(params, batch, delta)``: ``delta`` is the current perturbation
    [B, L, H] (None: zero, the first replay of a batch) and ``out.delta`` is the next
    replay's δ'. α defaults to ε (Shafahi et al.'s step). Π_ε clamps elementwise (linf) or
    rescales per example over (seq, hidden) (l2); padding positions of δ' are zero.
    ``out.loss`` and ``out.adv_loss`` are both L(θ, δ), the one loss this step computes.
    A non-finite G sets ``out.skipped`` and makes δ' zero.

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
    epsilon = require_positive("epsilon", epsilon)
    alpha = epsilon if alpha is None else require_positive("alpha", alpha)
    norm = require_norm(norm)
    chosen = resolve_target(model, "embeds", allowed=("embeds",))
    assert isinstance(chosen, EmbeddingOutput)
    perturbed = PerturbedModel(model, loss_fn, autocast)
    engine = Engine(perturbed, chosen, resolve_compile(compile, model))

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        delta: torch.Tensor | None = None,
        *,
        loss_scale: float | torch.Tensor = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch)
        scale = as_scale(loss_scale, call.device)
        current = _current_delta(delta, call.layout, chosen.dtype, call.device)
        with perturbed.hooked(count=not engine.compiled) as calls:
            at = engine.full(
                call.params,
                call.trainable,
                call.kwargs,
                call.layout,
                {"embeds": current},
                with_delta_grad=True,
                scale=scale,
            )
            check_hook_fired(calls)
        moved, finite = free_at_ascent(current, at.delta_grads["embeds"], call.layout, epsilon, alpha, norm)
        skipped = ~finite
        following = drop_if_skipped({"embeds": moved}, skipped)
        return at.param_grads, report(chosen, call.layout, following, at.loss, at.loss, skipped, at.logits)

    config = {"epsilon": epsilon, "alpha": alpha, "norm": norm, "target": "embeds", "forward_only_passes": 0}
    return Step("free_at", 1, config, step)


def _current_delta(delta: Any, layout: Layout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if delta is None:
        return torch.zeros(layout.shape, dtype=dtype, device=device)
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta must be a [batch, seq, hidden] tensor (a previous out.delta) or None, got {delta!r}")
    if tuple(delta.shape) != tuple(layout.shape):
        raise ValueError(
            f"delta has shape {tuple(delta.shape)} but this batch needs {tuple(layout.shape)}; "
            "pass delta=None to start a new batch's perturbation"
        )
    return delta.detach().to(dtype=dtype, device=device)
