"""The contract every step keeps on hostile input: one clear error, or finite grads, or ``out.skipped``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advfunc
from advfunc.app.classify.train import TrainConfig
from advfunc.methods import registry
from tests.support.catalogue import CATALOGUE
from tests.support.tiny_models import padded_batch, tiny_model


def _call(step: advfunc.Step, params, batch, **kwargs):
    """Call ``step`` its method's own way: SMART with its teacher (the params themselves), free AT from δ = 0."""
    if step.method == "smart":
        return step(params, batch, params if step.config["mu"] > 0 else None, **kwargs)
    if step.method == "free_at":
        return step(params, batch, None, **kwargs)
    return step(params, batch, **kwargs)


def _finite(grads: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads.values())


def _build(method: str, model, **options):
    needs = CATALOGUE[method].needs(model)  # ASCC, DNE: the synonym table
    return registry.factory_of(method)(model, **needs, **options)


# ---- finite inputs that overflow are reported (issue point 11) ----------------------------------------------------

HUGE = {
    "fgm weight": ("fgm", {"epsilon": 1e30}),
    "fgm embeds": ("fgm", {"epsilon": 1e30, "target": "embeds"}),
    "pgd embeds": ("pgd", {"epsilon": 1e30, "alpha": 1e30, "target": "embeds"}),
    "r3f": ("r3f", {"sigma": 1e20}),
    "awp": ("awp", {"adv_lr": 1e20, "adv_eps": 1e20}),
    "smart": ("smart", {"epsilon": 1e30, "step_size": 1e30, "noise_var": 1e30}),
    "vat": ("vat", {"epsilon": 1e30}),
    "freelb": ("freelb", {"lr": 1e30, "init_mag": 1e30}),
}


@pytest.mark.parametrize("case", sorted(HUGE))
def test_huge_finite_hyperparameters_never_give_unflagged_non_finite_grads(case):
    method, options = HUGE[case]
    model = tiny_model("bert")
    grads, out = _call(_build(method, model, **options), advfunc.params_of(model), padded_batch("bert"))
    assert _finite(grads) or bool(out.skipped), f"{case}: non-finite grads with out.skipped false"


def test_an_overflowing_step_is_flagged_not_just_tolerated():
    """FGM at ε = 1e30 really overflows (so the check above is not vacuous) and says so."""
    model = tiny_model("bert")
    grads, out = advfunc.fgm(model, epsilon=1e30)(advfunc.params_of(model), padded_batch("bert"))
    assert not _finite(grads)
    assert bool(out.skipped)
    _, fine = advfunc.fgm(model, epsilon=0.1)(advfunc.params_of(model), padded_batch("bert"))
    assert not bool(fine.skipped)


# ---- nesting (point 5) and targets (point 6) ----------------------------------------------------------------------


def test_a_step_nested_in_another_steps_loss_fn_acts_with_its_own_radius():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    inner = advfunc.fgm(model, epsilon=0.5, target="embeds")
    alone_grads, alone = inner(advfunc.params_of(model), batch)
    nested: dict[str, object] = {}

    def loss_fn(outputs, kwargs):
        if not nested:
            nested["grads"], nested["out"] = inner(advfunc.params_of(model), batch)
        return outputs.loss

    advfunc.fgm(model, epsilon=0.3, target="embeds", loss_fn=loss_fn)(advfunc.params_of(model), batch)
    out = nested["out"]
    assert torch.equal(out.adv_loss, alone.adv_loss), "the inner step saw the outer offset as well"
    for name, grad in alone_grads.items():
        assert torch.equal(nested["grads"][name], grad), name
    norms = out.delta.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5))


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_target_names_as_a_string_is_refused_and_not_offered(method):
    with pytest.raises(ValueError) as error:
        registry.factory_of(method)(tiny_model("bert"), target="names")
    message = str(error.value)
    assert message.startswith("unknown target 'names'")
    assert message.count("'names'") == 1, "the candidates list the rejected value"
    assert "['weight', 'embeds']" in message


# ---- batch and params validation (point 16) -----------------------------------------------------------------------


def _bad_calls(batch, params):
    return {
        "empty batch": (dict({k: v[:0] for k, v in batch.items()}), params, "at least one example"),
        "no tokens": (dict({k: (v[:, :0] if v.dim() == 2 else v) for k, v in batch.items()}), params, "one token"),
        "labels of another batch": (dict(batch, labels=batch["labels"][:2]), params, "'labels'"),
        "mask of another length": (
            dict(batch, attention_mask=batch["attention_mask"][:, :3]),
            params,
            "attention_mask",
        ),
        "float64 params": (batch, {k: v.double() for k, v in params.items()}, "float64"),
        "params on another device": (
            batch,
            {**params, next(iter(params)): next(iter(params.values())).to("meta")},
            "meta",
        ),
        "batch on another device": (dict(batch, labels=batch["labels"].to("meta")), params, "meta"),
    }


CASES = sorted(_bad_calls(padded_batch("bert"), advfunc.params_of(tiny_model("bert"))))
# Methods that need more batch keys (CAT, LAT: a causal LM's adversary completion) keep this
# contract on a decoder, in tests/methods/test_decoders.py.
CLASSIFIER_METHODS = [name for name in registry.available() if not registry.METHODS[name].batch_keys]


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_every_step_validates_batch_and_params_the_same_way(method):
    model = tiny_model("bert")
    step = _build(method, model)
    for case, (batch, params, named) in _bad_calls(padded_batch("bert"), advfunc.params_of(model)).items():
        with pytest.raises(ValueError) as error:
            _call(step, params, batch)
        assert named in str(error.value), f"{method}, {case}: {error.value}"


@pytest.mark.parametrize("method", ["vat", "r3f", "freelb", "smart"])
def test_a_generator_of_the_wrong_type_is_named(method):
    model = tiny_model("bert")
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        _build(method, model, generator=3)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        _call(_build(method, model), advfunc.params_of(model), padded_batch("bert"), generator="seed")


# ---- the property: refused with the value's name, or finite grads, or skipped -------------------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-30, 1e-8, 1e30, 1e300, -1.0, float("nan"), float("inf")]),
)
COUNTS = st.one_of(st.integers(min_value=-3, max_value=3), st.sampled_from([0, -1, 2]))


@st.composite
def method_and_arguments(draw):
    method = draw(st.sampled_from(CLASSIFIER_METHODS))
    numeric = {
        name: hyper
        for name, hyper in registry.hyperparameters(method).items()
        if hyper.kind in (int, float) and not isinstance(hyper.default, bool)
    }
    chosen = draw(st.lists(st.sampled_from(sorted(numeric)), unique=True, max_size=3)) if numeric else []
    options = {name: draw(COUNTS if numeric[name].kind is int else NUMBERS) for name in chosen}
    return method, options


@pytest.fixture(scope="module")
def model_and_batch():
    return tiny_model("bert"), padded_batch("bert", batch=2, length=6)


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=method_and_arguments())
def test_any_numeric_arguments_are_refused_by_name_or_give_finite_grads_or_skip(model_and_batch, drawn):
    method, options = drawn
    model, batch = model_and_batch
    try:
        step = _build(method, model, **options)
    except ValueError as error:
        assert any(name in str(error) for name in options), f"{method}{options}: {error}"
        return
    bad = [n for n, v in options.items() if isinstance(v, float) and not math.isfinite(v)]
    assert not bad, f"{method} accepted non-finite {bad}"
    grads, out = _call(step, advfunc.params_of(model), batch)
    assert _finite(grads) or bool(out.skipped), f"{method}{options}: non-finite grads, out.skipped false"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", float("nan")),
        ("lr", -1.0),
        ("warmup_ratio", float("nan")),
        ("warmup_ratio", 1.0),
        ("weight_decay", float("nan")),
        ("weight_decay", -0.1),
        ("max_grad_norm", float("nan")),
        ("epochs", 0),
    ],
)
def test_train_config_refuses_every_bad_number_by_name(field, value):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        TrainConfig(**{field: value}).check()


@pytest.mark.parametrize("loss_scale", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_loss_scale_that_is_not_a_finite_positive_number_is_refused(loss_scale):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
        advfunc.fgm(model)(advfunc.params_of(model), padded_batch("bert"), loss_scale=loss_scale)


def test_the_finiteness_check_sees_nan_and_both_infinities_without_a_gradient_sized_temporary():
    from torch.utils._python_dispatch import TorchDispatchMode

    from advfunc.core.step import all_finite

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.largest = max(self.largest, out.numel())
            return out

    grads = {"big": torch.randn(300, 64), "small": torch.randn(3), "empty": torch.zeros(0)}
    with Largest() as seen:
        assert bool(all_finite(grads))
    assert seen.largest < 64, "the check allocated a gradient-sized tensor"
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = {k: v.clone() for k, v in grads.items()}
        broken["big"][7, 5] = bad
        assert not bool(all_finite(broken)), bad
