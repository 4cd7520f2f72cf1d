"""Every registered method, any finite batch and hyper-parameters: a named refusal, a finite step, or a skip."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import advfunc
from advfunc.methods.registry import hyperparameters
from advfunc.methods.residual import HARMFUL
from tests.support.catalogue import CATALOGUE
from tests.support.tiny_decoders import completion_batch
from tests.support.tiny_models import VOCAB

finite_floats = st.one_of(
    st.floats(1e-4, 10.0),  # mostly in a method's working range, so most draws reach the step
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1e-30, 1e-6, 1e6, 1e30, -1e30]),
)


@functools.cache
def _model(name: str) -> torch.nn.Module:
    return CATALOGUE[name].make_model()


@st.composite
def classifier_batches(draw):
    size, length = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    ids = torch.tensor(draw(st.lists(st.integers(0, VOCAB - 1), min_size=size * length, max_size=size * length)))
    lengths = draw(st.lists(st.integers(1, length), min_size=size, max_size=size))
    mask = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).long()
    labels = torch.tensor(draw(st.lists(st.sampled_from([-100, 0, 1, 2]), min_size=size, max_size=size)))
    return {"input_ids": ids.view(size, length) * mask, "attention_mask": mask, "labels": labels}


@st.composite
def decoder_batches(draw, keys):
    """Completion batches with the method's ``keys``: ``labels``, ``adv_labels``, the ``harmful`` rows."""
    batch = completion_batch(draw(st.sampled_from(["left", "right"])), seed=draw(st.integers(0, 2**16)), adversary=True)
    batch = {key: value for key, value in batch.items() if key in keys}
    if HARMFUL in keys:
        batch[HARMFUL] = torch.tensor(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    if "labels" in batch and draw(st.booleans()):  # some completion tokens unscored (CAT, LAT may refuse adv_labels)
        dropped = torch.tensor(draw(st.lists(st.booleans(), min_size=30, max_size=30))).view(3, 10)
        batch["labels"] = batch["labels"].masked_fill(dropped, -100)
    return batch


@st.composite
def options(draw, name):
    chosen = {}
    for hyper in hyperparameters(name).values():
        if not draw(st.booleans()):
            continue  # keep the catalogue's tiny value
        if hyper.kind is float:
            chosen[hyper.name] = draw(finite_floats)
        elif hyper.kind is int:
            chosen[hyper.name] = draw(st.integers(-1, 3))
        elif hyper.kind is bool:
            chosen[hyper.name] = draw(st.booleans())
    return chosen


def _names(text: str, names) -> bool:
    return any(name in text for name in names)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_a_step_refuses_naming_the_argument_or_returns_finite_grads_or_skips(name, data):
    entry = CATALOGUE[name]
    model = _model(name)
    chosen = data.draw(options(name), label="hyper-parameters")
    batches = classifier_batches() if entry.model == "classifier" else decoder_batches(set(entry.make_batch()))
    batch = data.draw(batches, label="batch")
    loss_scale = data.draw(st.sampled_from([1.0, 1e-3, 2.0**16, 1e30]), label="loss_scale")
    try:
        step = entry.build(model, **chosen)
    except ValueError as error:
        assert _names(str(error), chosen), error
        event("refused at build")
        return
    params = advfunc.params_of(model)
    try:
        grads, out = entry.call(step, params, batch, loss_scale=loss_scale)
    except ValueError as error:
        assert _names(str(error), [*batch, *chosen, "loss_scale"]), error
        event("refused at the call")
        return
    finite = all(torch.isfinite(g).all() for g in grads.values()) and torch.isfinite(out.loss)
    event("skipped" if bool(out.skipped) else "finite")
    assert bool(out.skipped) or finite, (chosen, out.loss)
