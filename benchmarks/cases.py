"""What gets timed: each method's implementations as zero-argument callables on one model and batch.

An implementation (``impl``) is one of:

- ``plain``: one ordinary forward + ``loss.backward()`` on the module (the unit of cost);
- ``seed``: the imperative reference the parity tests use (``tests/support/classic_reference.py`` for
  FGM, PGD, FreeLB; ``tests/support/reference_methods.py`` for the other methods;
  ``tests/support/completion_reference.py`` for CAT and LAT) or, for NEFTune, transformers' own
  forward hook (what ``Trainer(neftune_noise_alpha=...)`` installs);
- ``eager``: advfunc's pure step, ``compile=False``;
- ``compiled``: advfunc's pure step, ``compile=True`` (methods whose factory takes ``compile``);
- ``baseline``: another revision's eager step (``python -m benchmarks.step --baseline REV``), to
  show a change made no method slower, measured in the same process as this checkout's.

Decoder workloads (a causal LM with LoRA) run their own table of methods, ``DECODER_METHODS``:
NEFTune, CAT and LAT, and the seed's FGM, PGD and FreeLB on ``target="embeds"`` (LoRA freezes
the embedding matrix the seed's classes perturb, so those have no ``seed`` implementation there).

Every callable is one training step up to ``optimizer.step()``: it starts from
``model.zero_grad(set_to_none=True)`` (what a loop's ``optimizer.zero_grad()`` does) and
leaves the gradient in ``p.grad`` (advfunc through ``advfunc.set_grads``), so the plain
step, the classic implementation and advfunc do the same work around the method itself.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

import advfunc
from advfunc.attacks.lat import middle_layer
from benchmarks.shapes import Workload

Runner = Callable[[], None]
Batch = Mapping[str, torch.Tensor]
IMPLS = ("plain", "seed", "eager", "compiled")
# The classic classes find the embedding matrix by this substring of its parameter name.
BERT_EMBEDDING_NAME = "word_embeddings"


@dataclass(frozen=True)
class Floor:
    """A method's pass-count floor (its forward+backward passes) in passes of the plain step's kind.

    ``delta_only``: passes that differentiate the perturbation only (no parameter
    gradient); ``forward_only``: passes with no backward at all (SMART's teacher).
    """

    full: int
    delta_only: int = 0
    forward_only: int = 0
    # The trainable parameters are small adapters (LoRA): a plain step's backward computes the
    # activation gradients and little else, so a δ-only pass costs as much as a full one.
    adapters: bool = False

    @property
    def passes(self) -> int:
        """Upper bound in plain-step units: a δ-only pass counted as a full one."""
        return self.full + self.delta_only

    @property
    def estimate(self) -> float:
        """The floor in plain-step units, a plain step being 1 forward + 2 backward units.

        A δ-only pass skips the weight-gradient half of the backward (2/3 of a plain
        step; a whole one with ``adapters``); a forward-only pass is 1/3. The profile of
        PGD-3 bears this out: its backward matmuls run 3.0× and its forward matmuls 4.0×
        the plain step's.
        """
        delta_only_cost = 1.0 if self.adapters else 2 / 3
        return self.full + delta_only_cost * self.delta_only + 1 / 3 * self.forward_only

    @property
    def text(self) -> str:
        parts = [f"{self.full} full"]
        if self.delta_only:
            parts.append(f"{self.delta_only} δ-only")
        if self.forward_only:
            parts.append(f"{self.forward_only} fwd-only")
        return " + ".join(parts)


@dataclass(frozen=True)
class MethodSpec:
    """One method as benchmarked: factory hyper-parameters, floor and imperative reference.

    ``reference(model, workload, hyper)`` returns ``run(batch)``; ``reference_devices``
    lists the device types the reference can run on (the references of the newer
    methods draw their noise on the CPU).
    """

    name: str
    title: str
    hyper: dict[str, Any]
    floor: Floor
    reference: Callable[[nn.Module, Workload, dict[str, Any]], Callable[[Batch], None]]
    reference_devices: tuple[str, ...] = ("cpu", "cuda")
    takes_generator: bool = False
    extra: str | None = None  # "teacher" (SMART) or "delta" (FreeAT): the step's third argument
    adversary: bool = False  # reads the batch's adv_labels (CAT, LAT); other steps get the batch without them
    notes: tuple[str, ...] = field(default_factory=tuple)


def autocast_context(workload: Workload) -> contextlib.AbstractContextManager[Any]:
    """The autocast region the plain step and the references run their forwards in."""
    if workload.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(workload.device).type, dtype=workload.autocast)


def _generator(workload: Workload, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=workload.device).manual_seed(seed)


# ---------------------------------------------------------------------------- references


def _seed_fgm(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from tests.support.classic_reference import FGM

    attack = FGM(model, emb_name=BERT_EMBEDDING_NAME, epsilon=hyper["epsilon"])

    def run(batch: Batch) -> None:
        # The blog post's loop, as users copy it.
        with autocast_context(workload):
            loss = model(**batch).loss
        loss.backward()
        attack.attack()
        with autocast_context(workload):
            loss_adv = model(**batch).loss
        loss_adv.backward()
        attack.restore()

    return run


def _seed_pgd(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from tests.support.classic_reference import PGD

    attack = PGD(model, emb_name=BERT_EMBEDDING_NAME, epsilon=hyper["epsilon"], alpha=hyper["alpha"])
    steps = hyper["steps"]

    def run(batch: Batch) -> None:
        with autocast_context(workload):
            loss = model(**batch).loss
        loss.backward()
        attack.backup_grad()
        for t in range(steps):
            attack.attack(is_first_attack=(t == 0))
            if t != steps - 1:
                model.zero_grad()
            else:
                attack.restore_grad()
            with autocast_context(workload):
                loss_adv = model(**batch).loss
            loss_adv.backward()
        attack.restore()

    return run


def _seed_freelb(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from tests.support.classic_reference import classic_freelb_grads

    generator = _generator(workload)

    def run(batch: Batch) -> None:
        # BERT takes inputs_embeds, so this is the official FreeLB loop literally. Its
        # final copy of every gradient (for the parity tests) is part of the timing.
        with autocast_context(workload):
            classic_freelb_grads(
                model,
                batch,
                hyper["steps"],
                hyper["lr"],
                hyper["init_mag"],
                hyper["max_norm"],
                hyper["norm"],
                generator,
                via="inputs_embeds",
            )

    return run


def _reference_vat(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from tests.support.reference_methods import reference_vat

    generator = _generator(workload)

    def run(batch: Batch) -> None:
        with autocast_context(workload):
            reference_vat(model, batch, hyper["epsilon"], hyper["xi"], hyper["alpha"], hyper["power_iters"], generator)

    return run


def _reference_smart(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from tests.support.reference_methods import reference_smart

    generator = _generator(workload)
    teacher = copy.deepcopy(model)  # the imperative θ̃: a second module (advfunc's is a params dict)

    def run(batch: Batch) -> None:
        with autocast_context(workload):
            reference_smart(
                model,
                teacher,
                batch,
                hyper["epsilon"],
                hyper["step_size"],
                hyper["steps"],
                hyper["noise_var"],
                hyper["lambda_s"],
                hyper["mu"],
                hyper["norm"],
                generator,
            )

    return run


def _reference_r3f(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from tests.support.reference_methods import reference_r3f

    generator = _generator(workload)

    def run(batch: Batch) -> None:
        with autocast_context(workload):
            reference_r3f(model, batch, hyper["sigma"], hyper["lambda_"], hyper["noise"], generator)

    return run


def _reference_awp(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from advfunc.attacks.awp import awp_parameters
    from tests.support.reference_methods import ReferenceAWP

    attack = ReferenceAWP(model, awp_parameters(model), hyper["adv_lr"], hyper["adv_eps"], hyper["adv_steps"])

    def run(batch: Batch) -> None:
        with autocast_context(workload):
            attack.grads(batch)

    return run


def _reference_free_at(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from tests.support.reference_methods import reference_free_at

    state: dict[str, torch.Tensor | None] = {"delta": None}

    def run(batch: Batch) -> None:
        # One replay; the next call replays the same batch with the carried δ.
        with autocast_context(workload):
            _, state["delta"] = reference_free_at(
                model, batch, state["delta"], hyper["epsilon"], hyper["alpha"], hyper["norm"]
            )

    return run


def _hooked_neftune(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings_of = cast(Callable[[], nn.Module], model.get_input_embeddings)
    embedding = embeddings_of()
    embedding.neftune_noise_alpha = hyper["alpha"]

    def run(batch: Batch) -> None:
        # Trainer keeps the hook for the whole training; here the other cases share the model.
        handle = embedding.register_forward_hook(neftune_post_forward_hook)
        try:
            with autocast_context(workload):
                loss = model(**batch).loss
            loss.backward()
        finally:
            handle.remove()

    return run


def _reference_completion(
    where: Callable[[nn.Module], str], rule: str
) -> Callable[[nn.Module, Workload, dict[str, Any]], Callable[[Batch], None]]:
    def reference(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
        from tests.support.completion_reference import reference_step

        places = [where(model)]
        knobs = {k: hyper[k] for k in ("epsilon", "alpha", "steps")}

        def run(batch: Batch) -> None:
            # The loop returns clones of the gradients and clears .grad: a copy of the adapters, small.
            with autocast_context(workload):
                reference_step(model, dict(batch), where=places, rule=rule, **knobs)

        return run

    return reference


# The reference implementations of the newer methods draw noise with CPU generators.
_CPU_ONLY = ("cpu",)
_NO_REFERENCE: tuple[str, ...] = ()


def _none(model: nn.Module, workload: Workload, hyper: dict[str, Any]) -> Callable[[Batch], None]:
    raise ValueError("this method has no imperative reference on a decoder with LoRA")


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("fgm", "FGM", {"epsilon": 1.0}, Floor(full=2), _seed_fgm),
        MethodSpec("pgd", "PGD-3", {"epsilon": 1.0, "alpha": 0.3, "steps": 3}, Floor(full=2, delta_only=2), _seed_pgd),
        MethodSpec(
            "freelb",
            "FreeLB-3",
            {"steps": 3, "lr": 0.05, "init_mag": 1.0, "max_norm": 0.0, "norm": "l2"},
            Floor(full=3),
            _seed_freelb,
            takes_generator=True,
        ),
        MethodSpec(
            "vat",
            "VAT-1",
            {"epsilon": 1.0, "xi": 0.1, "alpha": 1.0, "power_iters": 1},
            Floor(full=2, delta_only=1),
            _reference_vat,
            _CPU_ONLY,
            takes_generator=True,
        ),
        MethodSpec(
            "smart",
            "SMART-1",
            {
                "epsilon": 1e-5,
                "step_size": 1e-3,
                "steps": 1,
                "noise_var": 1e-5,
                "lambda_s": 1.0,
                "mu": 1.0,
                "norm": "linf",
            },
            Floor(full=2, delta_only=1, forward_only=1),
            _reference_smart,
            _CPU_ONLY,
            takes_generator=True,
            extra="teacher",
        ),
        MethodSpec(
            "r3f",
            "R3F",
            {"sigma": 1e-5, "lambda_": 1.0, "noise": "uniform"},
            Floor(full=2),
            _reference_r3f,
            _CPU_ONLY,
            takes_generator=True,
        ),
        MethodSpec("awp", "AWP-1", {"adv_lr": 1.0, "adv_eps": 0.01, "adv_steps": 1}, Floor(full=2), _reference_awp),
        MethodSpec(
            "free_at",
            "FreeAT",
            {"epsilon": 0.01, "alpha": 0.01, "norm": "linf"},
            Floor(full=1),
            _reference_free_at,
            _CPU_ONLY,
            extra="delta",
        ),
    )
}


EMBEDS = {"target": "embeds"}
DECODER_METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "neftune", "NEFTune", {"alpha": 5.0}, Floor(full=1, adapters=True), _hooked_neftune, takes_generator=True
        ),
        MethodSpec(
            "cat",
            "CAT-10",
            {"epsilon": 0.05, "alpha": 0.01, "steps": 10},
            # 10 δ-only passes, then toward, away and utility forwards with one backward through all three.
            Floor(full=3, delta_only=10, adapters=True),
            _reference_completion(lambda model: "embeds", "sign"),
            adversary=True,
        ),
        MethodSpec(
            "lat",
            "LAT-8",
            {"epsilon": 1.0, "alpha": 0.25, "steps": 8},
            Floor(full=3, delta_only=8, adapters=True),
            _reference_completion(middle_layer, "l2"),
            adversary=True,
        ),
        MethodSpec(
            "fgm", "FGM (embeds)", {"epsilon": 1.0, **EMBEDS}, Floor(full=2, adapters=True), _none, _NO_REFERENCE
        ),
        MethodSpec(
            "pgd",
            "PGD-3 (embeds)",
            {"epsilon": 1.0, "alpha": 0.3, "steps": 3, **EMBEDS},
            Floor(full=2, delta_only=2, adapters=True),
            _none,
            _NO_REFERENCE,
        ),
        MethodSpec(
            "freelb",
            "FreeLB-3",
            {"steps": 3, "lr": 0.05, "init_mag": 1.0, "max_norm": 0.0, "norm": "l2"},
            Floor(full=3, adapters=True),
            _none,
            _NO_REFERENCE,
            takes_generator=True,
        ),
    )
}


def method_specs(workload: Workload) -> dict[str, MethodSpec]:
    """The methods benchmarked on the workload's model family, by name."""
    return DECODER_METHODS if workload.shape.decoder else METHODS


# ---------------------------------------------------------------------------- advfunc


def factory_of(method: str, lib: ModuleType = advfunc) -> Callable[..., advfunc.Step] | None:
    """``lib``'s factory for ``method``: ``lib.<method>``, else ``lib.methods.<method>``.

    ``lib`` is this checkout's advfunc or another revision's (:mod:`benchmarks.baseline`).
    The fallback finds a method whose module exists before it is exported. None when
    neither exists (the method is not in that revision).
    """
    found = getattr(lib, method, None)
    if callable(found):
        return found
    try:
        module = importlib.import_module(f"{lib.__name__}.methods.{method}")
    except ModuleNotFoundError:
        return None
    found = getattr(module, method, None)
    return found if callable(found) else None


def available_methods(
    requested: list[str] | None = None, specs: dict[str, MethodSpec] = METHODS
) -> tuple[list[str], list[str]]:
    """(methods of ``specs`` to run, requested methods this checkout lacks), in ``specs`` order."""
    wanted = list(specs) if requested is None else requested
    unknown = [m for m in wanted if m not in specs]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(specs)}")
    present = [m for m in specs if m in wanted and factory_of(m) is not None]
    return present, [m for m in wanted if m not in present]


def supports_compile(method: str, lib: ModuleType = advfunc) -> bool:
    """Whether the method's factory in ``lib`` takes ``compile=``."""
    factory = factory_of(method, lib)
    return factory is not None and "compile" in inspect.signature(factory).parameters


def has_impl(method: str | None, impl: str, workload: Workload, baseline: ModuleType | None = None) -> bool:
    """Whether ``impl`` exists for ``method`` on the workload's device (None: the plain step)."""
    if method is None:
        return impl == "plain"
    if impl == "baseline":
        return baseline is not None and factory_of(method, baseline) is not None
    if impl == "seed":
        return torch.device(workload.device).type in method_specs(workload)[method].reference_devices
    if impl == "compiled":
        return supports_compile(method)
    return impl == "eager"


def build_step(
    method: str, model: nn.Module, workload: Workload, compiled: bool, lib: ModuleType = advfunc
) -> advfunc.Step:
    """``lib``'s step for ``method`` with the benchmark's hyper-parameters."""
    spec = method_specs(workload)[method]
    factory = factory_of(method, lib)
    if factory is None:
        raise ValueError(f"{lib.__name__} has no method {method!r}")
    kwargs: dict[str, Any] = dict(spec.hyper)
    if spec.takes_generator:
        kwargs["generator"] = _generator(workload)
    kwargs["autocast"] = workload.autocast
    if supports_compile(method, lib):
        kwargs["compile"] = compiled
    elif compiled:
        raise ValueError(f"{lib.__name__}.{method} takes no compile= option")
    return factory(model, **kwargs)


def _advfunc_runner(
    method: str,
    model: nn.Module,
    workload: Workload,
    compiled: bool,
    passes_only: bool = False,
    lib: ModuleType = advfunc,
) -> Callable[[Batch], None]:
    spec = method_specs(workload)[method]
    built = build_step(method, model, workload, compiled, lib)
    # passes_only: the method's passes without Step.__call__'s checks of the returned grads.
    step = built.fn if passes_only else built
    if spec.extra == "teacher":
        # teacher_of is exported by later revisions; earlier ones keep it in their teacher module.
        teacher_of = getattr(lib, "teacher_of", None) or importlib.import_module(f"{lib.__name__}.teacher").teacher_of
        teacher = teacher_of(lib.params_of(model))

        def run_with_teacher(batch: Batch) -> None:
            grads, _ = step(lib.params_of(model), batch, teacher)
            lib.set_grads(model, grads)

        return run_with_teacher
    if spec.extra == "delta":
        state: dict[str, Any] = {"delta": None}

        def run_with_delta(batch: Batch) -> None:
            grads, out = step(lib.params_of(model), batch, state["delta"])
            state["delta"] = out.delta
            lib.set_grads(model, grads)

        return run_with_delta

    def run(batch: Batch) -> None:
        grads, _ = step(lib.params_of(model), batch)
        lib.set_grads(model, grads)

    return run


def _plain(model: nn.Module, workload: Workload) -> Callable[[Batch], None]:
    def run(batch: Batch) -> None:
        with autocast_context(workload):
            loss = model(**batch).loss
        loss.backward()

    return run


def make_runner(
    method: str | None,
    impl: str,
    model: nn.Module,
    workload: Workload,
    batch: Batch,
    passes_only: bool = False,
    baseline: ModuleType | None = None,
) -> Runner:
    """One training step of ``impl`` (``method`` None: the plain step) bound to ``batch``.

    ``passes_only``: an advfunc step without ``Step.__call__``'s checks of its grads (diagnostic).
    ``baseline``: another revision of advfunc (:mod:`benchmarks.baseline`), run eagerly by impl ``"baseline"``.
    """
    if not has_impl(method, impl, workload, baseline):
        raise ValueError(f"no {impl!r} implementation of {method or 'plain'} on {workload.device}")
    spec = None if method is None else method_specs(workload)[method]
    if spec is None or not spec.adversary:
        batch = {key: value for key, value in batch.items() if key != "adv_labels"}
    if spec is None:
        inner = _plain(model, workload)
    elif impl == "seed":
        inner = spec.reference(model, workload, spec.hyper)
    elif impl == "baseline":
        assert baseline is not None and method is not None  # has_impl checked them
        inner = _advfunc_runner(method, model, workload, compiled=False, passes_only=passes_only, lib=baseline)
    else:
        assert method is not None
        inner = _advfunc_runner(method, model, workload, compiled=impl == "compiled", passes_only=passes_only)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        inner(batch)

    return run


def case_names(
    methods: list[str], impls: list[str], workload: Workload, baseline: ModuleType | None = None
) -> Iterator[tuple[str | None, str]]:
    """The (method, impl) pairs to run, the plain step first (the denominator of every ratio)."""
    yield None, "plain"
    for method in methods:
        for impl in impls:
            if impl != "plain" and has_impl(method, impl, workload, baseline):
                yield method, impl
