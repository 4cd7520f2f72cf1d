"""Where a perturbation lives: embedding rows, per-example embedding output, named parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import advfunc
from tests.support.classic_reference import classic_fgm_grads
from tests.support.parity import assert_grads_match
from tests.support.tiny_models import PAD_ID, padded_batch, tiny_model


def test_weight_rows_hold_each_token_once_and_skip_padding():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    _, out = advfunc.fgm(model)(advfunc.params_of(model), batch)
    ids = batch["input_ids"]
    used = out.delta_tokens[out.delta_tokens >= 0]
    assert sorted(used.tolist()) == sorted(set(ids.flatten().tolist()))
    assert out.delta.shape == (ids.numel(), 32)  # B·L slots: never vocabulary-sized
    pad_row = out.delta[out.delta_tokens == PAD_ID["bert"]]
    assert torch.equal(pad_row, torch.zeros_like(pad_row))  # padding_idx has no gradient, as in nn.Embedding
    unused = out.delta[out.delta_tokens < 0]
    assert torch.equal(unused, torch.zeros_like(unused))
    torch.testing.assert_close(out.delta.norm(), torch.tensor(1.0))  # ε = 1, one global norm


def test_weight_state_does_not_grow_with_vocabulary():
    small, large = tiny_model("bert", vocab=120), tiny_model("bert", vocab=5000)
    batch = padded_batch("bert")
    _, out_small = advfunc.pgd(small)(advfunc.params_of(small), batch)
    _, out_large = advfunc.pgd(large)(advfunc.params_of(large), batch)
    assert out_small.delta.shape == out_large.delta.shape


def test_embeds_target_norms_are_per_example_and_mask_padding():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    _, out = advfunc.fgm(model, epsilon=0.7, target="embeds")(advfunc.params_of(model), batch)
    norms = out.delta.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((4,), 0.7))
    padding = batch["attention_mask"] == 0
    assert torch.equal(out.delta[padding], torch.zeros_like(out.delta[padding]))


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_one_example_alone_equals_it_inside_the_batch(method):
    """Per-example target: example 1's perturbation does not depend on its batch mates."""
    model = tiny_model("bert")
    batch = padded_batch("bert")
    factory = {"fgm": lambda m: advfunc.fgm(m, target="embeds"), "pgd": lambda m: advfunc.pgd(m, target="embeds")}
    step = factory[method](model)
    _, out = step(advfunc.params_of(model), batch)
    alone = {k: v[1:2] for k, v in batch.items()}
    _, out_alone = step(advfunc.params_of(model), alone)
    # the mean loss over B examples scales each example's gradient by 1/B: directions agree
    torch.testing.assert_close(out.delta[1:2], out_alone.delta, rtol=1e-4, atol=1e-6)


def test_freelb_one_example_alone_equals_it_inside_the_batch():
    model = tiny_model("roberta")
    batch = padded_batch("roberta")
    step = advfunc.freelb(model, steps=3, lr=0.1, max_norm=0.3)
    _, out = step(advfunc.params_of(model), batch)
    _, out_alone = step(advfunc.params_of(model), {k: v[2:3] for k, v in batch.items()})
    torch.testing.assert_close(out.delta[2:3], out_alone.delta, rtol=1e-4, atol=1e-6)


def test_named_parameters_target_matches_the_classic_fgm_with_that_name():
    """target=[name] is the classic FGM with an emb_name that matches exactly that parameter."""
    model = tiny_model("bert")
    batch = padded_batch("bert")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    expected = classic_fgm_grads(copy.deepcopy(model), batch, "layer.0.attention.self.query.weight", epsilon=0.3)
    grads, out = advfunc.fgm(model, epsilon=0.3, target=[name])(advfunc.params_of(model), batch)
    assert_grads_match(grads, expected)
    assert set(out.delta) == {name}
    torch.testing.assert_close(out.delta[name].norm(), torch.tensor(0.3))


def test_named_target_norm_is_per_parameter():
    model = tiny_model("bert")
    names = ["classifier.weight", "bert.pooler.dense.weight"]
    _, out = advfunc.pgd(model, epsilon=0.2, alpha=0.5, steps=2, target=names)(
        advfunc.params_of(model), padded_batch("bert")
    )
    for name in names:
        torch.testing.assert_close(out.delta[name].norm(), torch.tensor(0.2))


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_every_family_trains_under_every_method(family):
    """Grads are finite and the perturbation moves the loss on each family."""
    model = tiny_model(family)
    batch = padded_batch(family)
    for step in (advfunc.fgm(model), advfunc.pgd(model, steps=2), advfunc.freelb(model, steps=2, lr=0.5)):
        grads, out = step(advfunc.params_of(model), batch)
        assert set(grads) == set(advfunc.trainable_names(model))
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert out.adv_loss != out.loss
