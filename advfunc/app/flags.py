"""Argparse value types that refuse a bad number in one line naming it and its range."""

from __future__ import annotations

import argparse
import math
from typing import Any


def number(kind: type, minimum: float, *, inclusive: bool = True, below: float | None = None) -> Any:
    """An argparse ``type``: text to a finite ``kind`` in [minimum, below) (or (minimum, ...) if not inclusive)."""
    lower = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    what = f"an integer {lower}" if kind is int else f"a finite number {lower}"
    if below is not None:
        what = f"a finite number in [{minimum:g}, {below:g})"

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        in_range = value >= minimum if inclusive else value > minimum
        if not (math.isfinite(value) and in_range and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


COUNT = number(int, 1)  # sizes, steps, epochs
NATURAL = number(int, 0)  # seeds, budgets; 0 allowed
POSITIVE = number(float, 0, inclusive=False)  # learning rate, radii
NON_NEGATIVE = number(float, 0)  # 0 turns it off
FRACTION = number(float, 0, below=1)
