"""Robust accuracy under attack: survivors over increasing radii, and the worst case over several attacks.

An example counts as robust at radius r when it is correct clean and no attack at any
radius r' ≤ r broke it: a perturbation found in the r'-ball also lies in the r-ball, so
this is the accuracy under the strongest attack run within r, and it never rises with
the radius. Each radius attacks only the examples still standing. The word-level worst
case counts an example only when it survives every word-level attack that ran on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import advfunc

# (indices of standing examples, radius) -> [len(indices)] bool: still correct under the attack
Holds = Callable[[list[int], float], torch.Tensor]
# indices of standing examples -> batches of them (the classifier groups by length)
Batcher = Callable[[list[int]], list[list[int]]]


class EvalMode:
    """Eval mode for the block, the previous mode restored after (training may continue)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def pgd_logits(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    radius: float,
    steps: int,
    target: str,
    step_size: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 PGD (:func:`advfunc.attacks.pgd`) on ``target``'s embeddings: (δ, logits at δ).

    .. math::
        δ_0 = 0,\\quad δ_t = Π_r\\big(δ_{t-1} + α · G_t/‖G_t‖₂\\big),\\quad
        G_t = ∇_δ \\mathrm{CE}\\big(f(x + δ), y\\big)

    with per-example norms over the perturbed positions (``"embeds"``: every token,
    ``"embeds@prompt"``: a causal LM's prompt), padding masked, α = 2.5·r/steps unless
    ``step_size`` is given (Madry et al., 2018). Cost: ``steps`` passes that differentiate
    δ only and one forward. ``FloatingPointError`` when the attack overflowed (δ = 0 after a
    non-finite gradient, or non-finite logits): a dropped δ is no attack the model withstood.
    """
    alpha = step_size if step_size is not None else 2.5 * radius / steps
    attack = advfunc.attacks.pgd(model, epsilon=radius, alpha=alpha, steps=steps, target=target, compile=False)
    delta = attack(params, batch)
    assert isinstance(delta, torch.Tensor)
    with torch.no_grad():
        logits = advfunc.perturbed_outputs(model, target)(params, batch, delta).logits
    if not bool(delta.abs().amax() > 0) or not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            f"PGD at radius {radius:g} overflowed (non-finite gradients or logits), so it cannot say "
            "whether the model is robust there; use smaller --radii"
        )
    return delta, logits


def chunks(indices: list[int], size: int) -> list[list[int]]:
    """``indices`` in consecutive batches of ``size``."""
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def survivors_over_radii(
    clean: torch.Tensor,
    radii: Sequence[float],
    holds: Holds,
    batches: Batcher,
    on_radius: Callable[[], None] = lambda: None,
) -> dict[float, float]:
    """{radius: share of examples standing after every attack up to it}, radii ascending; ``clean``: [N] bool,
    correct without attack. Cost: one call of ``holds`` per batch of survivors per radius."""
    alive = clean.clone().cpu()
    standing: dict[float, float] = {}
    for radius in sorted(radii):
        for chunk in batches(alive.nonzero().squeeze(1).tolist()):
            alive[chunk] &= holds(chunk, radius).cpu()
        standing[radius] = float(alive.float().mean()) if len(alive) else 0.0
        on_radius()
    return standing


def worst_case(survived: Sequence[Sequence[bool]]) -> float:
    """Share of examples that survive every word-level attack (each list: one attack, per example, same order)."""
    counts = {len(row) for row in survived}
    if len(counts) != 1:
        raise ValueError(f"the word-level attacks ran on different numbers of examples: {sorted(counts)}")
    width = counts.pop()
    return sum(all(row[i] for row in survived) for i in range(width)) / width if width else 0.0
