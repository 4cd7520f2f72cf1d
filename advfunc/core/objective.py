"""One backward of an objective built from several forwards, on fresh leaves.

The engine differentiates the loss of one forward. SMART and R3F differentiate a task
loss plus divergences between two or three forwards, so they build that objective
themselves and differentiate it once here, the way the eager engine does: fresh leaves
for the trainable parameters (never the caller's tensors, never a ``.grad``), the
embedding matrix by rows (one probe per forward), and ``torch.autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from advfunc.core.engine import Engine, owned
from advfunc.core.params import Params
from advfunc.core.step import Call


def fresh_leaves(params: Mapping[str, torch.Tensor], names: Sequence[str]) -> Params:
    """``{name: params[name]}`` for ``names`` as new leaves with ``requires_grad=True``.

    ``detach`` shares storage without a copy; the leaves are the step's own, so the
    caller's tensors keep their flags and never receive a gradient.
    """
    return {name: params[name].detach().requires_grad_(True) for name in names}


def frozen(params: Mapping[str, torch.Tensor]) -> Params:
    """``params`` detached: for passes that differentiate a perturbation only."""
    return {name: value.detach() for name, value in params.items()}


class Leaves:
    """The leaves of one backward over several forwards of ``call``.

    Fresh leaves for the trainable parameters, except the embedding matrix W when
    :meth:`Engine.rows_name` allows: each forward then gets a zero probe [B, L, H] at the
    embedding output (:meth:`probe`), and W's gradient is the probes' gradients added by
    token id into one [V, H] tensor, with no dense [V, H] gradient per forward.
    """

    def __init__(self, engine: Engine, call: Call) -> None:
        self.model = engine.model
        self.rows = engine.rows_name(call)
        self.ids = call.kwargs.get("input_ids")
        self.order = list(call.trainable)
        self.named = fresh_leaves(call.params, [n for n in call.trainable if n != self.rows])
        self.params = {**call.params, **self.named}  # what the forwards read
        self.probes: list[torch.Tensor] = []

    def probe(self) -> torch.Tensor | None:
        """A new probe for one more forward, or None when W is an ordinary leaf."""
        if self.rows is None:
            return None
        assert self.ids is not None  # rows_name requires input_ids
        probe = self.model.probe(self.ids).requires_grad_(True)
        self.probes.append(probe)
        return probe

    def gradient(self, objective: torch.Tensor) -> Params:
        """∂objective/∂θ for every trainable θ, in ``call.trainable`` order."""
        return self.gradients(objective)[0]

    def gradients(self, objective: torch.Tensor, *extra: torch.Tensor) -> tuple[Params, tuple[torch.Tensor, ...]]:
        """(∂objective/∂θ as :meth:`gradient`, ∂objective/∂e for each ``extra`` leaf e) in the one backward."""
        wrt = [*self.named.values(), *self.probes, *extra]
        found = torch.autograd.grad(objective, wrt, allow_unused=True, materialize_grads=True)
        grads, at_extra = found[: len(found) - len(extra)], found[len(found) - len(extra) :]
        # owned: autograd may return one tensor for two inputs; a caller clipping in place
        # must not scale a neighbour's gradient too.
        result = owned(dict(zip(self.named, grads[: len(self.named)], strict=True)))
        if self.rows is not None:
            assert self.ids is not None
            at_output = grads[len(self.named) :] or (self.model.probe(self.ids),)  # no forward: zero
            total = sum(at_output[1:], at_output[0])  # [B, L, H]: W[ids] summed over the forwards
            result[self.rows] = self.model.rows_gradient(self.ids, total, None)
        return {name: result[name] for name in self.order}, tuple(at_extra)
