"""advfunc.awp against the Kaggle-style imperative class, its selection, cost, box, purity, a real run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import advfunc
from advfunc.attacks.awp import awp_parameters
from advfunc.methods.awp import awp
from tests.support.method_harness import lockstep, short_run
from tests.support.purity import assert_step_is_pure
from tests.support.reference_methods import ReferenceAWP
from tests.support.tiny_models import padded_batch, tiny_model


@pytest.mark.parametrize(
    "family,adv_lr,adv_eps,adv_steps",
    [("bert", 1.0, 0.01, 1), ("bert", 0.05, 0.2, 3), ("gpt2", 0.5, 0.05, 2), ("roberta", 1e-3, 0.5, 2)],
)
def test_awp_matches_reference(family, adv_lr, adv_eps, adv_steps):
    moves = []

    def reference(model, batch):
        names = awp_parameters(model)
        grads, moved = ReferenceAWP(model, names, adv_lr, adv_eps, adv_steps).grads(batch)
        moves.append(moved)
        return grads

    step = None

    def functional(model, batch):
        nonlocal step
        step = step or awp(model, adv_lr=adv_lr, adv_eps=adv_eps, adv_steps=adv_steps)
        return step(advfunc.params_of(model), batch)

    outs = lockstep(family, reference, functional)
    for out, moved in zip(outs, moves, strict=True):
        assert set(out.delta) == set(moved)
        for name in moved:
            torch.testing.assert_close(out.delta[name], moved[name], rtol=1e-3, atol=1e-6)


def test_awp_default_selection_is_by_identity_and_type():
    model = tiny_model("bert")
    chosen = set(awp_parameters(model))
    embedding_weight = model.get_input_embeddings().weight
    by_tensor = {id(p): n for n, p in model.named_parameters()}
    assert by_tensor[id(embedding_weight)] not in chosen
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            assert not chosen & {by_tensor[id(p)] for p in module.parameters(recurse=False)}
        elif isinstance(module, nn.Linear):
            assert by_tensor[id(module.weight)] in chosen
            assert by_tensor[id(module.bias)] not in chosen
    assert "classifier.weight" in chosen


class TinyRMSNorm(nn.Module):
    """A norm layer of a class advfunc has never seen: found by its class name's ending."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_awp_selection_finds_norms_by_type_under_any_name():
    model = tiny_model("gpt2")
    # Renamed so that no parameter name says "ln" or "norm".
    model.transformer.add_module("final", TinyRMSNorm(32))
    chosen = awp_parameters(model)
    assert "transformer.final.weight" not in chosen
    assert not any(".ln_" in name for name in chosen)
    assert "transformer.wte.weight" not in chosen and "transformer.wpe.weight" not in chosen
    assert "transformer.h.0.attn.c_attn.weight" in chosen and "score.weight" in chosen


def test_awp_selection_skips_a_frozen_weight_and_accepts_explicit_names():
    model = tiny_model("bert")
    model.classifier.weight.requires_grad_(False)
    assert "classifier.weight" not in awp_parameters(model)
    step = awp(model, names=["bert.pooler.dense.weight", "bert.encoder.layer.1.output.dense.bias"])
    assert step.config["names"] == ("bert.pooler.dense.weight", "bert.encoder.layer.1.output.dense.bias")
    grads, out = step(advfunc.params_of(model), padded_batch("bert"))
    assert set(out.delta) == set(step.config["names"])
    assert set(grads) == set(advfunc.trainable_names(model))


@pytest.mark.parametrize(
    "names,error,match",
    [
        (["bert.nope.weight"], ValueError, "candidates"),
        (["classifier.weight"], ValueError, "frozen"),
        ([], ValueError, "empty"),
        ("classifier.bias", TypeError, "names"),
    ],
)
def test_awp_rejects_bad_names(names, error, match):
    model = tiny_model("bert")
    model.classifier.weight.requires_grad_(False)
    with pytest.raises(error, match=match):
        awp(model, names=names)


@settings(max_examples=15, deadline=None)
@given(
    adv_lr=st.floats(1e-4, 10.0),
    adv_eps=st.floats(1e-4, 1.0),
    adv_steps=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_awp_never_leaves_its_relative_box(tiny_bert, adv_lr, adv_eps, adv_steps, seed):
    model = tiny_bert
    params = advfunc.params_of(model)
    step = awp(model, adv_lr=adv_lr, adv_eps=adv_eps, adv_steps=adv_steps)
    _, out = step(params, padded_batch("bert", seed=seed % 50))
    assert set(out.delta) == set(awp_parameters(model))
    for name, delta in out.delta.items():
        w = params[name]
        moved = w + delta
        half = adv_eps * w.abs()
        assert torch.all(moved >= w - half) and torch.all(moved <= w + half), name


def test_awp_is_pure():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    step = awp(model, adv_steps=2)
    grads, _ = assert_step_is_pure(model, lambda: step(params, batch), params, batch)
    assert set(grads) == set(advfunc.trainable_names(model))


@pytest.mark.parametrize(
    "kwargs,name", [({"adv_lr": 0.0}, "adv_lr"), ({"adv_eps": -0.1}, "adv_eps"), ({"adv_steps": 0}, "adv_steps")]
)
def test_awp_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        awp(tiny_model("bert"), **kwargs)


def test_awp_short_run_decreases_the_loss():
    def make(model):
        step = awp(model, adv_lr=1.0, adv_eps=0.01)
        return lambda params, batch: step(params, batch)[0]

    before, after = short_run(make)
    assert after < before
