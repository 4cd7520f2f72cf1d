"""The method catalogue: every registered method once, with tiny hyper-parameters, its state and its cost.

Every property that holds for all methods (purity, non-finite handling, precision,
accumulation, cost, bad input) is tested by iterating over :data:`CATALOGUE`, so a
method added to the registry without an entry here fails ``test_registry``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

import advfunc
from advfunc.core.step import Step
from advfunc.methods.plain import plain
from tests.support.tiny_decoders import completion_batch, tiny_decoder
from tests.support.tiny_models import padded_batch, tiny_model


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Entry:
    """One method: ``build(model, **overrides)`` with tiny defaults, the model it trains, its cost.

    ``passes(settings)``: the documented cost in forward+backward passes for the
    factory's arguments (:meth:`settings`), written from the method's docstring (not read
    from the step). ``state(params)``: the keyword arguments a call takes beside the
    batch (SMART's teacher). ``aims_with_loss``: the perturbation follows the loss's
    gradient (not a divergence's, nor noise alone), so a non-finite loss gradient must
    drop it.
    """

    name: str
    factory: Callable[..., Step]
    defaults: Mapping[str, Any]
    passes: Callable[[Mapping[str, Any]], int]
    model: Literal["classifier", "decoder"] = "classifier"
    state: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] = lambda params: {}
    seeded: bool = False  # takes generator=
    aims_with_loss: bool = True

    def build(self, model: torch.nn.Module, **overrides: Any) -> Step:
        kwargs = {**self.defaults, **overrides}
        if self.seeded and "generator" not in kwargs:
            kwargs["generator"] = seeded()
        return self.factory(model, **kwargs)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Every argument of the factory as a call with ``overrides`` would see it."""
        signature = inspect.signature(self.factory)
        given = {n: p.default for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
        return {**given, **self.defaults, **overrides}

    def make_model(self, seed: int = 0) -> torch.nn.Module:
        return tiny_model("bert", seed=seed) if self.model == "classifier" else tiny_decoder("llama", seed=seed)

    def make_batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
        if self.model == "classifier":
            return padded_batch("bert", seed=seed)
        return completion_batch("right", seed=seed, adversary=True)

    def call(
        self, step: Step, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], **kwargs: Any
    ) -> tuple[dict[str, torch.Tensor], Any]:
        return step(params, batch, **self.state(params), **kwargs)


def _toward_away(extra: str) -> Callable[[Mapping[str, Any]], int]:
    return lambda c: c["steps"] + 1 + (c["away"] > 0) + (c[extra] > 0)


CATALOGUE: dict[str, Entry] = {
    entry.name: entry
    for entry in (
        Entry("none", plain, {}, lambda c: 1, aims_with_loss=False),
        Entry("fgm", advfunc.fgm, {"epsilon": 1.0}, lambda c: 2),
        Entry("pgd", advfunc.pgd, {"epsilon": 0.5, "alpha": 0.3, "steps": 2}, lambda c: c["steps"] + 1),
        Entry("freelb", advfunc.freelb, {"steps": 2, "lr": 0.05}, lambda c: c["steps"], seeded=True),
        Entry("neftune", advfunc.neftune, {"alpha": 5.0}, lambda c: 1, seeded=True, aims_with_loss=False),
        Entry(
            "cat",
            advfunc.cat,
            {"epsilon": 0.3, "alpha": 0.1, "steps": 2},
            _toward_away("utility"),
            model="decoder",
        ),
        Entry(
            "lat",
            advfunc.lat,
            {"layers": "model.layers.0", "epsilon": 0.5, "alpha": 0.2, "steps": 2},
            _toward_away("retain"),
            model="decoder",
        ),
        Entry(
            "vat",
            advfunc.vat,
            {"epsilon": 1.0, "xi": 0.1},
            lambda c: c["power_iters"] + 2,
            seeded=True,
            aims_with_loss=False,
        ),
        Entry("r3f", advfunc.r3f, {"sigma": 1e-2}, lambda c: 2, seeded=True, aims_with_loss=False),
        Entry("awp", advfunc.awp, {"adv_steps": 2}, lambda c: c["adv_steps"] + 1),
        Entry(
            "smart",
            advfunc.smart,
            {"epsilon": 1e-2, "step_size": 1e-2},
            lambda c: c["steps"] + 2,
            state=lambda params: {"teacher": advfunc.teacher_of(params)},
            seeded=True,
            aims_with_loss=False,
        ),
        Entry("free_at", advfunc.free_at, {"epsilon": 0.01}, lambda c: 1),
    )
}
