"""Validation of factory arguments and batch values: every bad value raises naming itself and the fix."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

NORMS = ("l2", "linf")

# Hyper-parameters enter float32 arithmetic, where a uniform draw spans 2·bound, a normal one
# reaches several σ and a step adds to a value of the same size: above about float32's
# maximum (3.4e38) over 16, torch raises raw overflow errors instead of computing. 2**120
# (1.3e36) leaves that headroom; a larger radius or step means nothing for a network anyway.
LARGEST = 2.0**120


def require_positive(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0 or value > LARGEST:
        raise ValueError(f"{name} must be a finite number > 0 and at most {LARGEST:.2g}, got {value!r}")
    return float(value)


def require_non_negative(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0 or value > LARGEST:
        raise ValueError(
            f"{name} must be a finite number >= 0 and at most {LARGEST:.2g} (0 turns it off), got {value!r}"
        )
    return float(value)


def require_steps(name: str, value: int) -> int:
    """Return ``value``, or raise unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value


def require_norm(value: str) -> str:
    """Return ``value``, or raise ``ValueError`` unless it names a known norm."""
    if value not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {value!r}")
    return value


def require_on_device(holds: torch.Tensor, error: Callable[[], Exception]) -> None:
    """Raise ``error()`` unless the 0-dim bool ``holds`` is true, without reading it back on CUDA.

    Checking a batch's values with ``bool(...)`` would wait for the CUDA stream on every
    step. ``torch._assert_async`` asserts on the device instead: on CUDA a false ``holds``
    fails the stream later (as ``nn.Embedding``'s own bounds check does); on CPU it raises
    at once, and only then does ``error`` read values to word its message.
    """
    try:
        torch._assert_async(holds, "advfunc: a batch check failed on the device")
    except RuntimeError:
        raise error() from None
