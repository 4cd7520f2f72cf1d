"""advfunc.free_at against the imperative reference over replays, its cost, ball, purity, a real run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advfunc
from advfunc.methods.free_at import free_at
from tests.support.method_harness import PassCounter, lockstep, short_run
from tests.support.purity import assert_step_is_pure
from tests.support.reference_methods import reference_free_at
from tests.support.tiny_models import padded_batch, tiny_model

VIA = {"bert": "inputs_embeds", "gpt2": "hook"}
REPLAYS = 3


@pytest.mark.parametrize(
    "family,norm,epsilon,alpha",
    [("bert", "linf", 0.02, None), ("bert", "l2", 0.5, 0.3), ("gpt2", "linf", 0.05, 0.03), ("gpt2", "l2", 1.0, None)],
)
def test_free_at_matches_reference_across_replays(family, norm, epsilon, alpha):
    """Each batch is replayed REPLAYS times with an SGD step between; δ carries across replays."""
    ref_state = {"delta": None, "replay": 0}
    func_state = {"delta": None, "replay": 0}
    seen = []

    def batch_of(state, batch):
        # lockstep hands a new batch at every call; replay the first one REPLAYS times.
        if state["replay"] % REPLAYS == 0:
            state["batch"] = batch
            state["delta"] = None
        state["replay"] += 1
        return state["batch"]

    def reference(model, batch):
        batch = batch_of(ref_state, batch)
        grads, ref_state["delta"] = reference_free_at(
            model, batch, ref_state["delta"], epsilon, alpha or epsilon, norm, via=VIA[family]
        )
        seen.append(ref_state["delta"])
        return grads

    step = None

    def functional(model, batch):
        nonlocal step
        step = step or free_at(model, epsilon=epsilon, alpha=alpha, norm=norm)
        batch = batch_of(func_state, batch)
        grads, out = step(advfunc.params_of(model), batch, func_state["delta"])
        func_state["delta"] = out.delta
        return grads, out

    outs = lockstep(family, reference, functional, steps=2 * REPLAYS)
    for out, expected in zip(outs, seen, strict=True):
        torch.testing.assert_close(out.delta, expected, rtol=1e-4, atol=1e-6)
        assert not bool(out.skipped)


def test_free_at_cost_is_one_pass_per_replay():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    step = free_at(model)
    assert step.passes == 1 and step.config["forward_only_passes"] == 0
    delta = None
    with PassCounter(model) as count:
        for _ in range(REPLAYS):
            _, out = step(params, batch, delta)
            delta = out.delta
    assert count.forwards == REPLAYS * step.passes
    assert count.backwards == REPLAYS * step.passes


@settings(max_examples=15, deadline=None)
@given(
    epsilon=st.floats(1e-4, 2.0),
    alpha_ratio=st.floats(0.1, 3.0),
    norm=st.sampled_from(["linf", "l2"]),
    replays=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_free_at_delta_stays_in_its_ball_across_replays(tiny_bert, epsilon, alpha_ratio, norm, replays, seed):
    model = tiny_bert
    params = advfunc.params_of(model)
    batch = padded_batch("bert", seed=seed % 50)
    step = free_at(model, epsilon=epsilon, alpha=epsilon * alpha_ratio, norm=norm)
    delta = None
    for _ in range(replays):
        grads, out = step(params, batch, delta)
        # The replay's optimizer step, done functionally: the model is shared between examples.
        params = {n: p - 0.1 * grads[n] if n in grads else p for n, p in params.items()}
        delta = out.delta
        if norm == "linf":
            assert delta.abs().max() <= epsilon
        else:
            assert delta.flatten(1).norm(dim=1).max() <= epsilon * (1 + 1e-6)
        assert torch.all(delta[batch["attention_mask"] == 0] == 0)


def test_free_at_is_pure_and_leaves_the_incoming_delta_alone():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    step = free_at(model)
    _, first = step(params, batch)
    incoming = first.delta.clone()
    grads, _ = assert_step_is_pure(model, lambda: step(params, batch, first.delta), params, batch)
    assert torch.equal(first.delta, incoming)
    assert set(grads) == set(advfunc.trainable_names(model))


def test_free_at_rejects_a_delta_of_another_batch():
    model = tiny_model("bert")
    step = free_at(model)
    _, out = step(advfunc.params_of(model), padded_batch("bert"))
    with pytest.raises(ValueError, match="delta=None"):
        step(advfunc.params_of(model), padded_batch("bert", length=7), out.delta)
    with pytest.raises(TypeError, match="delta"):
        step(advfunc.params_of(model), padded_batch("bert"), [0.0])


@pytest.mark.parametrize(
    "kwargs,name", [({"epsilon": 0.0}, "epsilon"), ({"alpha": -1.0}, "alpha"), ({"norm": "l1"}, "norm")]
)
def test_free_at_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        free_at(tiny_model("bert"), **kwargs)


def test_free_at_short_run_decreases_the_loss():
    def make(model):
        step = free_at(model, epsilon=0.01)
        state = {"delta": None}

        def train(params, batch):
            grads, out = step(params, batch, state["delta"])
            state["delta"] = out.delta
            return grads

        return train

    before, after = short_run(make)
    assert after < before
