"""Adversarial-training methods by name, for the CLI, the training loop and the Trainer.

A method is one line of :data:`METHODS`: its factory and the batch keys it needs. Its
hyper-parameters are read from the factory's signature, so
``--method pgd:epsilon=0.5,steps=2`` works for every method without more code.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from advfunc.core.completion import ADV_LABELS
from advfunc.core.step import Step
from advfunc.methods.ascc import ascc
from advfunc.methods.awp import awp
from advfunc.methods.cat import cat
from advfunc.methods.dne import dne
from advfunc.methods.fgm import fgm
from advfunc.methods.free_at import free_at
from advfunc.methods.freelb import freelb
from advfunc.methods.lat import lat
from advfunc.methods.neftune import neftune
from advfunc.methods.pgd import pgd
from advfunc.methods.plain import plain
from advfunc.methods.r3f import r3f
from advfunc.methods.refat import refat
from advfunc.methods.rerouting import rerouting
from advfunc.methods.residual import HARMFUL
from advfunc.methods.smart import smart
from advfunc.methods.vat import vat


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``factory``: returns a ``Step`` (a method with state of its own, SMART's teacher or
    free AT's δ, carries it through :mod:`advfunc.core.stateful`). ``batch_keys``: keys the
    batch must carry beyond the model's arguments (CAT and LAT: the adversary's completion
    of a causal LM, ``adv_labels``; ReFAT and rerouting: which rows are harmful, ``harmful``).
    """

    factory: Callable[..., Step]
    batch_keys: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    "none": Method(plain),
    "fgm": Method(fgm),
    "pgd": Method(pgd),
    "freelb": Method(freelb),
    "neftune": Method(neftune),
    "cat": Method(cat, batch_keys=(ADV_LABELS,)),
    "lat": Method(lat, batch_keys=(ADV_LABELS,)),
    "refat": Method(refat, batch_keys=(HARMFUL,)),
    "rerouting": Method(rerouting, batch_keys=(HARMFUL,)),
    "vat": Method(vat),
    "r3f": Method(r3f),
    "awp": Method(awp),
    "smart": Method(smart),
    "free_at": Method(free_at),
    "ascc": Method(ascc),
    "dne": Method(dne),
}

# Factory arguments a training loop supplies itself, or that a command line cannot spell.
_NOT_HYPERPARAMETERS = {"model", "loss_fn", "generator", "autocast", "compile", "names"}


class MethodError(ValueError):
    """An unknown method or hyper-parameter, or a value of the wrong type."""


@dataclass(frozen=True)
class Hyperparameter:
    """One scalar argument of a factory: its name, default and the type its text parses to."""

    name: str
    default: Any
    kind: type


@dataclass(frozen=True)
class MethodSpec:
    """A method and the hyper-parameters given explicitly (the rest keep the factory defaults)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``pgd`` or ``pgd(epsilon=0.5,steps=2)``: the name reports and folders use."""
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"

    @property
    def method(self) -> Method:
        return METHODS[self.name]

    @property
    def identity(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """The method with every default filled in: ``fgm`` and ``fgm:epsilon=1.0`` are one identity."""
        settings = {k: h.default for k, h in hyperparameters(self.name).items()}
        settings.update(self.options)
        return self.name, tuple(sorted(settings.items()))


def available() -> list[str]:
    """Names of the registered methods."""
    return list(METHODS)


def factory_of(name: str) -> Callable[..., Step]:
    """The factory function of method ``name``."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {available()}")
    return METHODS[name].factory


def hyperparameters(name: str) -> dict[str, Hyperparameter]:
    """The factory's scalar arguments (numbers, strings, flags) that a method spec can set."""
    signature = inspect.signature(factory_of(name))
    found = {}
    for arg in signature.parameters.values():
        if arg.name in _NOT_HYPERPARAMETERS or arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD):
            continue
        kind = _kind_of(arg)
        if kind is not None:
            found[arg.name] = Hyperparameter(arg.name, arg.default, kind)
    return found


def _kind_of(arg: inspect.Parameter) -> type | None:
    default = arg.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float, str)):
        return type(default)
    if default is None:  # ``alpha: float | None = None``: the annotation says what the text means
        words = set(re.findall(r"[A-Za-z_]+", str(arg.annotation)))
        for kind in (float, int, str):
            if kind.__name__ in words:
                return kind
    return None


def parse_method(text: str) -> MethodSpec:
    """Parse ``NAME`` or ``NAME:key=value,key=value`` into a checked ``MethodSpec``."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    known = hyperparameters(name)
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise MethodError(f"method spec {text!r}: {item!r} is not key=value")
        if key in known:
            options[key] = _parse_value(name, known[key], value.strip())
        else:
            raise MethodError(f"method {name!r} has no hyper-parameter {key!r}; it takes {sorted(known)}")
    return MethodSpec(name, options)


def _parse_value(method: str, hyper: Hyperparameter, text: str) -> Any:
    if hyper.kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise MethodError(f"{method}: {hyper.name} must be true or false, got {text!r}")
    if hyper.kind is str:
        return text
    try:
        value = hyper.kind(text)
    except ValueError:
        what = "an integer" if hyper.kind is int else "a number"
        raise MethodError(f"{method}: {hyper.name} must be {what}, got {text!r}") from None
    if hyper.kind is float and not math.isfinite(value):
        raise MethodError(f"{method}: {hyper.name} must be a finite number, got {text!r}")
    return value


def draws_noise(spec: MethodSpec) -> bool:
    """Whether the method's factory takes a generator (VAT, FreeLB, R3F, SMART draw from it)."""
    return "generator" in inspect.signature(factory_of(spec.name)).parameters


def seeded_generator(model: nn.Module, seed: int) -> torch.Generator:
    """The generator a method draws from in a run with ``seed``, on the model's device."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    return torch.Generator(device=device).manual_seed(10_000 + seed)


def needs_synonyms(spec: MethodSpec) -> bool:
    """Whether the method's factory takes a synonym table (``synonyms=``: ASCC, DNE), which a spec cannot spell."""
    return "synonyms" in inspect.signature(factory_of(spec.name)).parameters


def build_step(
    spec: MethodSpec, model: nn.Module, seed: int = 0, generator: torch.Generator | None = None, **extra: Any
) -> Step:
    """Call the factory of ``spec`` on ``model``.

    A factory that draws random numbers gets ``generator``, by default one seeded from
    ``seed`` (:func:`seeded_generator`), so a run is reproducible; a training loop that
    checkpoints passes its own and saves its state. ``extra`` arguments (``loss_fn``,
    ``autocast``) are passed where accepted. Bad values raise the factory's own
    ``ValueError``/``TypeError``.
    """
    factory = factory_of(spec.name)
    accepted = inspect.signature(factory).parameters
    kwargs = dict(spec.options)
    if "generator" in accepted:
        kwargs["generator"] = generator if generator is not None else seeded_generator(model, seed)
    kwargs.update({k: v for k, v in extra.items() if k in accepted and v is not None})
    return factory(model, **kwargs)
