"""Property tests of every attack's bound: δ never leaves its ball or box, whatever the gradient.

Attacks that read ``grads`` are given arbitrary gradients (zero, tiny, huge, non-finite),
so most examples run no model pass; the rest run one δ-only pass on a tiny BERT.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advfunc
from advfunc import attacks
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_models import padded_batch, tiny_model

SLACK = 1 + 1e-5  # float32 round-off of a norm
NAMES = ["bert.pooler.dense.weight", "classifier.bias"]


@pytest.fixture(scope="module")
def bert_setup(tiny_bert):
    """The shared tiny BERT, its params and a padded batch: read, never written."""
    return tiny_bert, advfunc.params_of(tiny_bert), padded_batch("bert")


def _gradient(shape, seed: int, scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _padding(batch) -> torch.Tensor:
    return ~batch["attention_mask"].bool()


sizes = st.floats(min_value=1e-4, max_value=1e3)
scales = st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e30])
seeds = st.integers(0, 2**16)


@settings(max_examples=40, deadline=None)
@given(
    target=st.sampled_from(["weight", "embeds", "names"]),
    epsilon=sizes,
    ratio=st.floats(0.01, 10.0),
    steps=st.integers(1, 2),
    scale=scales,
    seed=seeds,
    method=st.sampled_from(["fgm", "pgd"]),
)
def test_fgm_and_pgd_stay_in_the_l2_ball(bert_setup, target, epsilon, ratio, steps, scale, seed, method):
    model, params, batch = bert_setup
    spec = NAMES if target == "names" else target
    attack = (
        attacks.fgm(model, epsilon, target=spec)
        if method == "fgm"
        else attacks.pgd(model, epsilon, ratio * epsilon, steps, target=spec)
    )
    if target == "names":
        grads = {n: _gradient(params[n].shape, seed + i, scale) for i, n in enumerate(NAMES)}
    elif target == "weight":
        grads = _gradient((4 * 12, 32), seed, scale)
    else:
        grads = _gradient((4, 12, 32), seed, scale)
    delta = attack(params, batch, grads)
    pieces = delta.values() if isinstance(delta, dict) else [delta]
    assert all(bool(torch.isfinite(p).all()) for p in pieces)
    if target == "embeds":
        assert bool((delta.flatten(1).norm(dim=1) <= epsilon * SLACK).all())
        assert bool((delta[_padding(batch)] == 0).all())
    else:
        assert all(float(p.norm()) <= epsilon * SLACK for p in pieces)
    if scale == 0 and (method == "fgm" or steps == 1):
        assert all(bool((p == 0).all()) for p in pieces), "a zero gradient must give δ = 0"


@pytest.mark.parametrize("target", ["weight", "embeds"])
def test_a_non_finite_gradient_gives_a_zero_delta(bert_setup, target):
    model, params, batch = bert_setup
    shape = (48, 32) if target == "weight" else (4, 12, 32)
    for bad in (float("nan"), float("inf")):
        grads = torch.ones(shape)
        grads[0, 0] = bad
        delta = attacks.fgm(model, 1.0, target=target)(params, batch, grads)
        assert bool((delta == 0).all())


@settings(max_examples=30, deadline=None)
@given(max_norm=sizes, lr=sizes, norm=st.sampled_from(["l2", "linf"]), scale=scales, seed=seeds)
def test_freelb_stays_within_max_norm(bert_setup, max_norm, lr, norm, scale, seed):
    model, params, batch = bert_setup
    attack = attacks.freelb(model, steps=1, lr=lr, max_norm=max_norm, norm=norm)
    delta = attack(params, batch, _gradient((4, 12, 32), seed, scale))
    assert bool(torch.isfinite(delta).all())
    if norm == "l2":
        assert bool((delta.flatten(1).norm(dim=1) <= max_norm * SLACK).all())
    else:
        assert float(delta.abs().max()) <= max_norm * SLACK
    assert bool((delta[_padding(batch)] == 0).all())
    if scale == 0:
        assert bool((delta == 0).all())


@settings(max_examples=30, deadline=None)
@given(
    epsilon=sizes,
    ratio=st.floats(0.01, 10.0),
    norm=st.sampled_from(["l2", "linf"]),
    scale=scales,
    seed=seeds,
    start_scale=st.floats(0.0, 10.0),
)
def test_free_at_stays_in_its_ball_from_any_start(bert_setup, epsilon, ratio, norm, scale, seed, start_scale):
    model, params, batch = bert_setup
    attack = attacks.free_at(model, epsilon, ratio * epsilon, norm)
    start = _gradient((4, 12, 32), seed + 1, start_scale * epsilon)
    delta = attack(params, batch, _gradient((4, 12, 32), seed, scale), start=start)
    assert bool(torch.isfinite(delta).all())
    if norm == "linf":
        assert float(delta.abs().max()) <= epsilon * SLACK
    else:
        assert bool((delta.flatten(1).norm(dim=1) <= epsilon * SLACK).all())
    assert bool((delta[_padding(batch)] == 0).all())
    if scale == 0:
        zero_start = attack(params, batch, torch.zeros(4, 12, 32))
        assert bool((zero_start == 0).all()), "a zero gradient from δ = 0 must give δ = 0"


@settings(max_examples=30, deadline=None)
@given(adv_eps=st.floats(1e-4, 1.0), adv_lr=sizes, scale=scales, seed=seeds)
def test_awp_stays_in_its_relative_box(bert_setup, adv_eps, adv_lr, scale, seed):
    model, params, batch = bert_setup
    attack = attacks.awp(model, adv_lr, adv_eps, names=NAMES)
    grads = {n: _gradient(params[n].shape, seed + i, scale) for i, n in enumerate(NAMES)}
    delta = attack(params, batch, grads)
    for name in NAMES:
        assert bool(torch.isfinite(delta[name]).all())
        assert bool((delta[name].abs() <= adv_eps * params[name].abs() * SLACK + 1e-30).all())
        if scale == 0:
            assert bool((delta[name] == 0).all())


@settings(max_examples=15, deadline=None)
@given(epsilon=sizes, seed=seeds)
def test_vat_direction_has_norm_epsilon_per_example(bert_setup, epsilon, seed):
    model, params, batch = bert_setup
    r = attacks.vat(model, epsilon=epsilon, xi=0.1)(params, batch, generator=torch.Generator().manual_seed(seed))
    norms = r.flatten(1).norm(dim=1)
    assert bool(((norms - epsilon).abs() <= epsilon * 1e-5).all() | (norms == 0).all())
    assert bool((r[_padding(batch)] == 0).all())


@settings(max_examples=15, deadline=None)
@given(epsilon=st.floats(1e-6, 1.0), step_size=sizes, norm=st.sampled_from(["l2", "linf"]), seed=seeds)
def test_smart_stays_in_its_per_token_ball(bert_setup, epsilon, step_size, norm, seed):
    model, params, batch = bert_setup
    attack = attacks.smart(model, epsilon, step_size, noise_var=epsilon, norm=norm)
    delta = attack(params, batch, generator=torch.Generator().manual_seed(seed))
    assert bool(torch.isfinite(delta).all())
    if norm == "linf":
        assert float(delta.abs().max()) <= epsilon * SLACK
    else:
        assert bool((delta.norm(dim=-1) <= epsilon * SLACK).all())


@settings(max_examples=20, deadline=None)
@given(sigma=sizes, seed=seeds)
def test_r3f_uniform_noise_stays_in_its_box(bert_setup, sigma, seed):
    model, params, batch = bert_setup
    z = attacks.r3f(model, sigma)(params, batch, generator=torch.Generator().manual_seed(seed))
    assert float(z.abs().max()) <= sigma * SLACK
    assert bool((z[_padding(batch)] == 0).all())


ATTACKS = {
    "fgm": lambda m: attacks.fgm(m, 0.5),
    "pgd": lambda m: attacks.pgd(m, 0.5, 0.2, 2, target="embeds"),
    "freelb": lambda m: attacks.freelb(m, init_mag=0.1, generator=torch.Generator().manual_seed(0)),
    "free_at": lambda m: attacks.free_at(m),
    "vat": lambda m: attacks.vat(m, generator=torch.Generator().manual_seed(0)),
    "smart": lambda m: attacks.smart(m, generator=torch.Generator().manual_seed(0)),
    "r3f": lambda m: attacks.r3f(m, generator=torch.Generator().manual_seed(0)),
    "awp": lambda m: attacks.awp(m, adv_steps=2),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_is_pure(name):
    model = tiny_model("bert")
    model.bert.encoder.layer[0].train(False)  # a mixed mode must survive too
    params, batch = advfunc.params_of(model), padded_batch("bert")
    attack = ATTACKS[name](model)
    delta = assert_step_is_pure(model, lambda: attack(params, batch), params, batch)
    pieces = delta.values() if isinstance(delta, dict) else [delta]
    assert all(bool(torch.isfinite(p).all()) for p in pieces)
    assert repr(attack).startswith(f"advfunc.attacks.{name}(")
