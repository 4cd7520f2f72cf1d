"""Random perturbations of the embedding output, drawn from an explicit generator.

VAT's direction, SMART's start and R3F's noise are [B, L, H] draws, padding masked. The
draw has the layout's full shape and comes first from the generator, so a caller with a
generator seeded the same way draws the same numbers.
"""

from __future__ import annotations

import torch

from advfunc.core.targets import Layout


def require_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """Return ``generator``, or raise ``TypeError`` unless it is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None (the global RNG), got {type(generator).__name__}")
    return generator


def gaussian(
    layout: Layout, std: float, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """std · N(0, I) of shape [B, L, H], zero at padding."""
    assert layout.mask is not None
    noise = torch.randn(layout.shape, generator=generator, dtype=dtype, device=device)  # [B, L, H]
    return noise * std * layout.mask


def uniform(
    layout: Layout, bound: float, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """U(−bound, bound) of shape [B, L, H], zero at padding."""
    assert layout.mask is not None
    noise = torch.empty(layout.shape, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
    return noise * layout.mask
