"""Targeted LAT: lockstep parity with the imperative loop, the KL retain term, purity, bounds, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advfunc
from advfunc import attacks
from advfunc.methods.registry import METHODS, build_step, parse_method
from tests.support.completion_reference import reference_step
from tests.support.parity import assert_grads_match
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_decoders import LAYER, completion_batch, prompt_of, tiny_decoder

LR = 0.5


def _lockstep(family, padding, layers, *, retain_kl=False, away=1.0):
    ours, theirs = tiny_decoder(family), tiny_decoder(family)
    frozen = tiny_decoder(family)  # the reference model: the starting weights
    reference = advfunc.teacher_of(advfunc.params_of(frozen)) if retain_kl else None
    step = advfunc.lat(ours, layers=layers, epsilon=1.5, alpha=0.5, steps=3, away=away)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=LR)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=LR)
    names = [layers] if isinstance(layers, str) else layers
    for t in range(3):
        batch = completion_batch(padding, seed=10 + t, adversary=True)
        expected, delta = _reference(theirs, batch, names, frozen if retain_kl else None, away)
        grads, out = step(advfunc.params_of(ours), batch, reference)
        assert_grads_match(grads, expected, where=f"{family} step {t}")
        got = out.delta if isinstance(out.delta, dict) else {names[0]: out.delta}
        for name in names:
            torch.testing.assert_close(got[name], delta[name], rtol=1e-4, atol=1e-6)
            assert float(got[name].abs().max()) > 0
        advfunc.set_grads(ours, grads)
        opt_ours.step()
        for name, p in theirs.named_parameters():
            p.grad = expected[name]
        opt_theirs.step()
        opt_ours.zero_grad(set_to_none=True)
        opt_theirs.zero_grad(set_to_none=True)


def _reference(model, batch, names, frozen, away):
    return reference_step(
        model, batch, where=names, epsilon=1.5, alpha=0.5, steps=3, rule="l2", away=away, reference_model=frozen
    )


@pytest.mark.parametrize(("family", "padding"), [("llama", "left"), ("gpt2", "right"), ("qwen2", "left")])
def test_lat_matches_the_imperative_loop_in_lockstep(family, padding):
    _lockstep(family, padding, LAYER[family])


def test_lat_with_a_kl_retain_term_and_no_away_term():
    _lockstep("llama", "right", LAYER["llama"], retain_kl=True, away=0.0)


def test_lat_at_two_layers():
    _lockstep("llama", "right", ["model.layers.0", "model.layers.1"])


def test_the_step_is_pure_and_its_delta_is_the_attack():
    model = tiny_decoder("qwen2")
    params, batch = advfunc.params_of(model), completion_batch("left", adversary=True)
    reference = advfunc.teacher_of(params)
    step = advfunc.lat(model, layers="model.layers.0", steps=2)
    grads, out = assert_step_is_pure(model, lambda: step(params, batch, reference), params, batch)
    assert step.passes == 5 and sorted(grads) == sorted(advfunc.trainable_names(model))
    attack = attacks.lat(model, layers="model.layers.0", steps=2)
    delta = assert_step_is_pure(model, lambda: attack(params, batch), params, batch)
    torch.testing.assert_close(delta, out.delta)


_MODEL = tiny_decoder("gpt2")


@settings(max_examples=12, deadline=None)
@given(
    epsilon=st.floats(0.01, 3.0),
    alpha=st.floats(0.01, 2.0),
    steps=st.integers(1, 3),
    padding=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 50),
)
def test_the_attack_stays_in_its_per_token_ball_and_on_the_prompt(epsilon, alpha, steps, padding, seed):
    batch = completion_batch(padding, seed=seed, adversary=True)
    attack = attacks.lat(
        _MODEL, layers=["transformer.h.0", "transformer.h.1"], epsilon=epsilon, alpha=alpha, steps=steps
    )
    delta = attack(advfunc.params_of(_MODEL), batch)
    assert sorted(delta) == ["transformer.h.0", "transformer.h.1"]
    for value in delta.values():
        assert bool((value[~prompt_of(batch)] == 0).all())
        assert float(value.norm(dim=-1).max()) <= epsilon * (1 + 1e-5)


def test_bad_input_is_refused():
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.0"):
        advfunc.lat(model, layers="model.layer.9")
    with pytest.raises(ValueError, match=r"not a module; name the module .*'model\.layers\.0\.mlp\.up_proj'"):
        advfunc.lat(model, layers="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="retain"):
        advfunc.lat(model, toward=0.0, away=0.0, retain=0.0)
    step = advfunc.lat(model, steps=1)
    batch = completion_batch("right", adversary=True)
    with pytest.raises(ValueError, match="adv_labels"):
        step(advfunc.params_of(model), {k: v for k, v in batch.items() if k != "adv_labels"})


def test_lat_is_registered():
    assert "lat" in METHODS and METHODS["lat"].batch_keys == ("adv_labels",)
    step = build_step(parse_method("lat:layers=model.layers.1,steps=2"), tiny_decoder("llama"))
    assert step.method == "lat" and step.config["layers"] == ["model.layers.1"] and step.passes == 5
    assert step.config["target"] == "module@prompt"
