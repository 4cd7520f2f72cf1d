"""The method catalogue: every registered method once, with tiny hyper-parameters, its state and its cost.

Every property that holds for all methods (purity, non-finite handling, precision,
accumulation, cost, bad input) is tested by iterating over :data:`CATALOGUE`, so a
method added to the registry without an entry here fails ``test_registry``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

import advfunc
from advfunc.core.stateful import State, stateful
from advfunc.core.step import Step
from advfunc.methods.plain import plain
from advfunc.methods.registry import METHODS
from advfunc.methods.residual import HARMFUL
from tests.support.tiny_decoders import VOCAB, completion_batch, tiny_decoder, tiny_lora_decoder
from tests.support.tiny_models import VOCAB as CLASSIFIER_VOCAB
from tests.support.tiny_models import padded_batch, tiny_model


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Entry:
    """One method: ``build(model, **overrides)`` with tiny defaults, the model it trains, its cost.

    ``passes(settings)``: the documented cost in forward+backward passes for the
    factory's arguments (:meth:`settings`), written from the method's docstring (not read
    from the step); ``forward_only(settings)`` the forwards it runs without a backward.
    ``cost_variants``: settings whose cost the pass-count test checks, one code path each.
    Every call goes through the stateful protocol (:func:`advfunc.stateful`): the state
    from ``step.init(params)`` (SMART's teacher, free AT's δ, ReFAT's direction, LAT's KL
    reference), then ``step.update(params, batch, state)``.
    ``needs(model)``: arguments the method and its attack take for that model (ASCC and
    DNE: a synonym table of the model's vocabulary).
    ``labelled``: the batch has ``labels`` (rerouting's loss reads hidden states only).
    ``aims_with_loss``: the perturbation follows the loss's
    gradient (not a divergence's, nor noise alone), so a non-finite loss gradient must
    drop it.
    """

    name: str
    factory: Callable[..., Step]
    defaults: Mapping[str, Any]
    passes: Callable[[Mapping[str, Any]], int]
    model: Literal["classifier", "decoder", "lora decoder"] = "classifier"
    seeded: bool = False  # takes generator=
    labelled: bool = True
    aims_with_loss: bool = True
    forward_only: Callable[[Mapping[str, Any]], int] = lambda settings: 0
    cost_variants: tuple[Mapping[str, Any], ...] = ({},)
    needs: Callable[[torch.nn.Module], Mapping[str, Any]] = lambda model: {}

    def build(self, model: torch.nn.Module, **overrides: Any) -> Step:
        kwargs = {**self.needs(model), **self.defaults, **overrides}
        if self.seeded and "generator" not in kwargs:
            kwargs["generator"] = seeded()
        return self.factory(model, **kwargs)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Every argument of the factory as a call with ``overrides`` would see it."""
        signature = inspect.signature(self.factory)
        given = {n: p.default for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
        return {**given, **self.defaults, **overrides}

    def make_model(self, seed: int = 0) -> torch.nn.Module:
        if self.model == "classifier":
            return tiny_model("bert", seed=seed)
        if self.model == "lora decoder":
            return tiny_lora_decoder(seed=seed).get_base_model()
        return tiny_decoder("llama", seed=seed)

    def make_batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
        if self.model == "classifier":
            return padded_batch("bert", seed=seed)
        keys = METHODS[self.name].batch_keys
        batch = completion_batch("right", seed=seed, adversary=advfunc.ADV_LABELS in keys)
        if not self.labelled:
            del batch["labels"]
        if HARMFUL in keys:
            batch[HARMFUL] = torch.arange(batch["input_ids"].shape[0]) % 2 == 0
        return batch

    @staticmethod
    def init(step: Step, params: Mapping[str, torch.Tensor]) -> State:
        """The protocol's state before the first step (its passes are not the step's: ReFAT's direction)."""
        return stateful(step).init(params)

    @staticmethod
    def call(
        step: Step,
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        state: State | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """``grads, out`` of ``step.update(params, batch, state)``, from ``step.init(params)`` unless given.

        ``kwargs`` (``loss_scale``, ``generator``) go to the method's own call inside the update.
        """
        if kwargs:
            step = dataclasses.replace(step, fn=functools.partial(step.fn, **kwargs))
        protocol = stateful(step)
        grads, out, _ = protocol.update(params, batch, protocol.init(params) if state is None else state)
        return grads, out


def _prompts(seed: int) -> dict[str, torch.Tensor]:
    """Three left-padded prompts of lengths 5, 3 and 4: ReFAT's prompt sets."""
    ids = torch.randint(3, VOCAB, (3, 5), generator=seeded(seed))
    mask = (torch.arange(5) >= torch.tensor([[0], [2], [1]])).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


REFUSED, ANSWERED = _prompts(1), _prompts(2)


def tiny_synonyms(vocab: int = CLASSIFIER_VOCAB, width: int = 4, seed: int = 0) -> advfunc.attacks.SynonymTable:
    """Random distinct synonyms for a tiny vocabulary: up to ``width`` a token; every third token (0 too) has none."""
    g = seeded(seed)
    ids = torch.randint(1, vocab, (vocab, width), generator=g)
    repeated = (ids.unsqueeze(2) == ids.unsqueeze(1)).tril(diagonal=-1).any(dim=2)  # an id already in the row
    mask = (torch.rand(vocab, width, generator=g) < 0.7) & (ids != torch.arange(vocab).unsqueeze(1)) & ~repeated
    mask[::3] = False
    return advfunc.attacks.SynonymTable(ids, mask)


def synonyms_for(model: torch.nn.Module) -> dict[str, Any]:
    """``{"synonyms": table}`` for ``model``'s vocabulary (ASCC, DNE)."""
    return {"synonyms": tiny_synonyms(model.get_input_embeddings().num_embeddings)}


def _grid(**axes: list[Any]) -> tuple[dict[str, Any], ...]:
    """Every combination of the values of ``axes``: {name: values} -> ({name: value, ...}, ...)."""
    return tuple(dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values()))


def _toward_away(clean: str) -> Callable[[Mapping[str, Any]], int]:
    """K attack passes, the toward term, the away and clean terms unless weighted 0."""
    return lambda c: c["steps"] + 1 + (c["away"] > 0) + (c[clean] > 0)


def _clean_forward(clean: str) -> Callable[[Mapping[str, Any]], int]:
    """A clean term of weight 0 is still computed for ``out.loss``: a forward without backward."""
    return lambda c: 1 if c[clean] == 0 else 0


CATALOGUE: dict[str, Entry] = {
    entry.name: entry
    for entry in (
        Entry("none", plain, {}, lambda c: 1, aims_with_loss=False),
        Entry("fgm", advfunc.fgm, {"epsilon": 1.0}, lambda c: 2, cost_variants=_grid(target=["weight", "embeds"])),
        Entry(
            "pgd",
            advfunc.pgd,
            {"epsilon": 0.5, "alpha": 0.3, "steps": 2},
            lambda c: c["steps"] + 1,
            cost_variants=_grid(steps=[1, 3], target=["weight", "embeds"]),
        ),
        Entry(
            "freelb",
            advfunc.freelb,
            {"steps": 2, "lr": 0.05},
            lambda c: c["steps"],
            seeded=True,
            cost_variants=_grid(steps=[1, 3]),
        ),
        Entry("neftune", advfunc.neftune, {"alpha": 5.0}, lambda c: 1, seeded=True, aims_with_loss=False),
        Entry(
            "cat",
            advfunc.cat,
            {"epsilon": 0.3, "alpha": 0.1, "steps": 2},
            _toward_away("utility"),
            model="decoder",
            forward_only=_clean_forward("utility"),
            cost_variants=_grid(away=[1.0, 0.0], utility=[1.0, 0.0]),
        ),
        Entry(
            "lat",
            advfunc.lat,
            {"layers": "model.layers.0", "epsilon": 0.5, "alpha": 0.2, "steps": 2},
            _toward_away("retain"),
            model="decoder",
            forward_only=lambda c: _clean_forward("retain")(c) + c["retain_kl"],  # the KL reference's forward
            cost_variants=(
                {"away": 1.0, "retain": 1.0},
                {"away": 0.0, "retain": 1.0},
                {"away": 1.0, "retain": 0.0},
                {"away": 1.0, "retain": 1.0, "retain_kl": True},
            ),
        ),
        Entry(
            "vat",
            advfunc.vat,
            {"epsilon": 1.0, "xi": 0.1},
            lambda c: c["power_iters"] + 2,
            seeded=True,
            aims_with_loss=False,
            cost_variants=_grid(power_iters=[1, 3]),
        ),
        Entry("r3f", advfunc.r3f, {"sigma": 1e-2}, lambda c: 2, seeded=True, aims_with_loss=False),
        Entry(
            "awp", advfunc.awp, {"adv_steps": 2}, lambda c: c["adv_steps"] + 1, cost_variants=_grid(adv_steps=[1, 3])
        ),
        Entry(
            "smart",
            advfunc.smart,
            {"epsilon": 1e-2, "step_size": 1e-2},
            lambda c: c["steps"] + 2,
            seeded=True,
            aims_with_loss=False,
            forward_only=lambda c: 1 if c["mu"] > 0 else 0,  # the teacher's forward
            cost_variants=({"mu": 1.0, "steps": 1}, {"mu": 1.0, "steps": 3}, {"mu": 0.0, "steps": 2}),
        ),
        Entry("free_at", advfunc.free_at, {"epsilon": 0.01}, lambda c: 1),
        Entry(
            "ascc",
            advfunc.ascc,
            {"steps": 2},
            lambda c: c["steps"] + 2,
            aims_with_loss=False,  # it ascends the KL from the clean prediction
            cost_variants=_grid(steps=[1, 3]),
            needs=synonyms_for,
        ),
        Entry(
            "dne",
            advfunc.dne,
            {"steps": 2},
            lambda c: c["steps"] + 1,
            seeded=True,
            cost_variants=_grid(steps=[1, 3]),
            needs=synonyms_for,
        ),
        Entry(
            "refat",
            advfunc.refat,
            {"layers": "model.layers.0", "p": 1.0, "harmful": REFUSED, "harmless": ANSWERED},
            lambda c: 1,
            model="decoder",
            seeded=True,
            aims_with_loss=False,  # r̂ comes from two prompt sets' hidden states, not from a gradient
            cost_variants=_grid(p=[0.0, 1.0]),
        ),
        Entry(
            "rerouting",
            advfunc.rerouting,
            {"layers": "model.layers.0"},
            lambda c: 1,
            model="lora decoder",
            labelled=False,
            aims_with_loss=False,  # it perturbs nothing
            forward_only=lambda c: 1,  # the reference forward with the adapters off
            cost_variants=_grid(reroute=[1.0, 0.0]),
        ),
    )
}
