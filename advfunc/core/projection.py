"""Projections onto norm balls: Π_ε(δ), the constraint every attack keeps.

Norms are computed in float32 whatever the input dtype, so fp16/bf16 perturbations
project without overflow; the result keeps the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from advfunc.core.norms import l2_norm


def project_l2(
    delta: torch.Tensor, epsilon: float | torch.Tensor, dims: Sequence[int] | int | None = None
) -> torch.Tensor:
    """Π_ε(δ) = δ · min(1, ε / ‖δ‖₂), the norm taken over ``dims`` (all dims when None).

    ``dims=(1, 2)`` on a ``[B, L, H]`` perturbation projects each example onto its own
    ball. A δ inside the ball is returned unchanged (bitwise); zero stays zero.
    ``epsilon`` is a float > 0, or a tensor broadcastable to the kept dims.
    """
    _check_epsilon(epsilon)
    norm = l2_norm(delta, dims)  # fp32, keepdim
    outside = norm > epsilon
    scale = epsilon / torch.where(outside, norm, torch.ones_like(norm))
    projected = (delta.float() * scale).to(delta.dtype)
    return torch.where(outside, projected, delta)


def project_linf(delta: torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
    """Π_ε(δ) = clamp(δ, −ε, ε): the L∞ ball of radius ``epsilon`` (a float > 0 or a tensor)."""
    _check_epsilon(epsilon)
    if isinstance(epsilon, torch.Tensor):
        eps = epsilon.to(delta.dtype)
        return torch.minimum(torch.maximum(delta, -eps), eps)
    return delta.clamp(-epsilon, epsilon)


def _check_epsilon(epsilon: float | torch.Tensor) -> None:
    if isinstance(epsilon, torch.Tensor):
        return  # tensors come from traced code; checking them would force a device sync
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}")
