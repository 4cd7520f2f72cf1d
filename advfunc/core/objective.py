"""One backward of an objective built from several forwards, on fresh leaves.

The engine differentiates the loss of one forward. VAT, SMART and R3F differentiate a
task loss plus divergences between two or three forwards, so they build that objective
themselves and differentiate it once here, the way the eager engine does: fresh leaves
for the trainable parameters (never the caller's tensors, never a ``.grad``) and
``torch.autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from advfunc.core.engine import owned
from advfunc.core.params import Params


def fresh_leaves(params: Mapping[str, torch.Tensor], names: Sequence[str]) -> Params:
    """``{name: params[name]}`` for ``names`` as new leaves with ``requires_grad=True``.

    ``detach`` shares storage without a copy; the leaves are the step's own, so the
    caller's tensors keep their flags and never receive a gradient.
    """
    return {name: params[name].detach().requires_grad_(True) for name in names}


def frozen(params: Mapping[str, torch.Tensor]) -> Params:
    """``params`` detached: for passes that differentiate a perturbation only."""
    return {name: value.detach() for name, value in params.items()}


def gradient(objective: torch.Tensor, wrt: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∂objective/∂wrt[name] for every name; zeros where the objective does not depend on it.

    Each tensor has storage of its own: autograd may return one tensor for two inputs,
    and a caller that clips ``p.grad`` in place must not scale a neighbour's as well.
    """
    grads = torch.autograd.grad(objective, list(wrt.values()), allow_unused=True, materialize_grads=True)
    return owned(dict(zip(wrt, grads, strict=True)))
