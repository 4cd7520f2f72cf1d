"""CAT: lockstep parity with the imperative loop, purity, the bounds of its attack, bad input."""

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
from tests.support.tiny_decoders import completion_batch, prompt_of, tiny_decoder

LR = 0.5


@pytest.mark.parametrize(
    ("family", "padding", "norm", "weights"),
    [
        ("llama", "right", "l2", (1.0, 1.0, 1.0)),
        ("gpt2", "left", "linf", (0.5, 2.0, 1.0)),
        ("qwen2", "right", "l2", (1.0, 0.0, 0.0)),
    ],
)
def test_cat_matches_the_imperative_loop_in_lockstep(family, padding, norm, weights):
    toward, away, utility = weights
    ours, theirs = tiny_decoder(family), tiny_decoder(family)
    step = advfunc.cat(ours, epsilon=0.3, alpha=0.1, steps=3, norm=norm, toward=toward, away=away, utility=utility)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=LR)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=LR)
    for t in range(3):
        batch = completion_batch(padding, seed=t, adversary=True)
        expected, deltas = reference_step(
            theirs,
            batch,
            where=["embeds"],
            epsilon=0.3,
            alpha=0.1,
            steps=3,
            rule="sign",
            norm=norm,
            toward=toward,
            away=away,
            clean=utility,
        )
        grads, out = step(advfunc.params_of(ours), batch)
        assert_grads_match(grads, expected, where=f"{family} step {t}")
        torch.testing.assert_close(out.delta, deltas["embeds"], rtol=1e-4, atol=1e-6)
        assert float(out.delta.abs().max()) > 0
        advfunc.set_grads(ours, grads)
        opt_ours.step()
        for name, p in theirs.named_parameters():
            p.grad = expected[name]
        opt_theirs.step()
        opt_ours.zero_grad(set_to_none=True)
        opt_theirs.zero_grad(set_to_none=True)


def test_the_step_is_pure_and_the_attack_lowers_the_adversary_loss():
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch("left", adversary=True)
    step = advfunc.cat(model, epsilon=0.5, alpha=0.1, steps=4)
    grads, out = assert_step_is_pure(model, lambda: step(params, batch), params, batch)
    assert step.passes == 7 and sorted(grads) == sorted(advfunc.trainable_names(model))
    attack = attacks.cat(model, epsilon=0.5, alpha=0.1, steps=4)
    delta = assert_step_is_pure(model, lambda: attack(params, batch), params, batch)
    torch.testing.assert_close(delta, out.delta)
    adversary = {
        **batch,
        "input_ids": torch.where(batch["adv_labels"] != -100, batch["adv_labels"], batch["input_ids"]),
        "labels": batch["adv_labels"],
    }
    adversary.pop("adv_labels")
    adversary["attention_mask"] = adversary["attention_mask"] | (batch["adv_labels"] != -100).long()
    loss_at = advfunc.perturbed_loss(model, target="embeds")
    assert float(loss_at(params, adversary, delta)) < float(loss_at(params, adversary, torch.zeros_like(delta)))


@settings(max_examples=12, deadline=None)
@given(
    epsilon=st.floats(0.01, 2.0),
    alpha=st.floats(0.01, 1.0),
    steps=st.integers(1, 3),
    norm=st.sampled_from(["l2", "linf"]),
    padding=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 50),
)
def test_the_attack_stays_in_its_ball_and_on_the_prompt(epsilon, alpha, steps, norm, padding, seed):
    model = _MODEL
    batch = completion_batch(padding, seed=seed, adversary=True)
    delta = attacks.cat(model, epsilon=epsilon, alpha=alpha, steps=steps, norm=norm)(advfunc.params_of(model), batch)
    outside = ~prompt_of(batch)
    assert bool((delta[outside] == 0).all())
    size = delta.norm(dim=-1) if norm == "l2" else delta.abs().amax(dim=-1)
    assert float(size.max()) <= epsilon * (1 + 1e-5)
    assert float(size[prompt_of(batch)].min()) > 0


_MODEL = tiny_decoder("llama")


def test_bad_input_is_refused():
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch("right", adversary=True)
    step = advfunc.cat(model, steps=1)
    with pytest.raises(ValueError, match="adv_labels"):
        step(params, {k: v for k, v in batch.items() if k != "adv_labels"})
    overlapping = batch["adv_labels"].clone()
    overlapping[0, 0] = 5
    with pytest.raises(ValueError, match="prompt"):
        step(params, {**batch, "adv_labels": overlapping})
    with pytest.raises(ValueError, match="labels"):
        step(params, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="utility"):
        advfunc.cat(model, toward=0.0, away=0.0, utility=0.0)
    with pytest.raises(ValueError, match="norm"):
        advfunc.cat(model, norm="l1")


def test_cat_is_registered():
    assert "cat" in METHODS and METHODS["cat"].batch_keys == (advfunc.ADV_LABELS,)
    step = build_step(parse_method("cat:steps=2,away=0.5"), tiny_decoder("gpt2"))
    assert step.method == "cat" and step.config["steps"] == 2 and step.passes == 5
