"""Overflow-safe norms and ascent directions, always in float32.

‖g‖₂ is computed as m·‖g/m‖₂ with m = max|g|, so a gradient whose squared norm
overflows (fp16 above ~256, fp32 above ~1e19) still gives a finite direction. A
non-finite gradient is reported, never turned into a NaN perturbation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _dims(x: torch.Tensor, dims: Sequence[int] | int | None) -> list[int]:
    if dims is None:
        return list(range(x.dim()))
    if isinstance(dims, int):
        return [dims]
    return list(dims)


def max_abs(x: torch.Tensor, dims: Sequence[int] | int | None = None) -> torch.Tensor:
    """max |x| over ``dims`` (all when None) in float32, keepdim; NaN if any entry is NaN."""
    dims_ = _dims(x, dims)
    if x.dim() == 0:
        return x.float().abs()
    return x.float().abs().amax(dim=dims_, keepdim=True)


def l2_norm(x: torch.Tensor, dims: Sequence[int] | int | None = None) -> torch.Tensor:
    """‖x‖₂ over ``dims`` (all when None) in float32, keepdim, without overflow."""
    scale = max_abs(x, dims)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    dims_ = _dims(x, dims)
    if x.dim() == 0:
        return scale
    return safe * (x.float() / safe).pow(2).sum(dim=dims_, keepdim=True).sqrt() * (scale > 0)


def l2_direction(
    g: torch.Tensor, dims: Sequence[int] | int | None = None, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g / max(‖g‖₂, floor) over ``dims``, in float32; finite).

    The direction is 0 where g = 0 or g is not finite; ``finite`` is a 0-dim bool tensor
    that is true when every entry of ``g`` is finite. ``floor`` > 0 reproduces FreeLB's
    ``clamp(norm, min=1e-8)``; ``floor = 0`` is the classic FGM/PGD classes' ``if norm != 0`` rule.
    """
    unit, scale, finite = _scaled(g, dims)
    norm = unit.pow(2).sum(dim=_dims(g, dims), keepdim=True).sqrt()
    if floor > 0:
        norm = torch.maximum(norm, floor / scale)
    return unit / torch.where(norm > 0, norm, torch.ones_like(norm)), finite


def linf_direction(
    g: torch.Tensor, dims: Sequence[int] | int | None = None, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g / max(‖g‖∞, floor) over ``dims``, in float32; finite): 0 where g = 0 or not finite."""
    unit, scale, finite = _scaled(g, dims)
    if floor > 0:
        return unit / torch.clamp(floor / scale, min=1.0), finite
    return unit, finite


def _scaled(g: torch.Tensor, dims: Sequence[int] | int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g / max|g| with 0 where unusable, max|g| with 1 where unusable, all-finite flag)."""
    scale = max_abs(g, dims)
    finite = torch.isfinite(scale).all()
    usable = (scale > 0) & torch.isfinite(scale)
    safe = torch.where(usable, scale, torch.ones_like(scale))
    unit = torch.where(usable, g.float() / safe, torch.zeros((), device=g.device))
    return unit, safe, finite
