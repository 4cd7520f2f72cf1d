"""Gradient accumulation: each micro-batch attacked with its own gradient, grads summed."""

from __future__ import annotations

import copy

import pytest
import torch

import advfunc
from advfunc.scale.accumulation import accumulate, split_batch
from tests.support.catalogue import CATALOGUE, seeded
from tests.support.classic_reference import FGM
from tests.support.parity import assert_grads_match
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_models import EMBEDDING_NAME, padded_batch, tiny_model


def micro_batches():
    return [padded_batch("bert", batch=3, seed=1), padded_batch("bert", batch=2, length=9, seed=2)]


def _micro_batches_for(entry):
    if entry.model == "classifier":
        return micro_batches()
    return [entry.make_batch(seed=1), entry.make_batch(seed=2)]


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_two_micro_batches_sum_to_the_two_single_steps(name):
    entry = CATALOGUE[name]
    model = entry.make_model()
    step = entry.build(model)
    params = advfunc.params_of(model)
    state = entry.init(step, params)

    def through_protocol(params, batch, **kwargs):  # every micro-batch from the same state
        return entry.call(step, params, batch, state, **kwargs)

    def draws():  # the same noise for the single steps as for the accumulated ones
        return {"generator": seeded(7)} if entry.seeded else {}

    first, second = _micro_batches_for(entry)
    singles = draws()
    one, out_one = through_protocol(params, first, **singles)
    two, out_two = through_protocol(params, second, **singles)
    grads, acc = accumulate(through_protocol, params, [first, second], **draws())
    assert list(grads) == list(one)
    for key in one:
        torch.testing.assert_close(grads[key], one[key] + two[key], rtol=1e-6, atol=1e-9)
    # each micro-batch's attack is its own: the same δ as a standalone step on it
    torch.testing.assert_close(acc.outs[1].delta, out_two.delta)
    torch.testing.assert_close(acc.loss, (out_one.loss + out_two.loss) / 2)
    assert not bool(acc.skipped)

    mean, _ = accumulate(through_protocol, params, [first, second], reduction="mean", **draws())
    for key in one:
        torch.testing.assert_close(mean[key], (one[key] + two[key]) / 2, rtol=1e-6, atol=1e-9)


def test_accumulate_is_pure():
    model = tiny_model("bert")
    step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=2)
    params = advfunc.params_of(model)
    first, second = micro_batches()
    second_before = {k: v.clone() for k, v in second.items()}
    assert_step_is_pure(model, lambda: accumulate(step, params, [first, second], reduction="mean"), params, first)
    assert all(torch.equal(second[k], second_before[k]) for k in second)


def test_the_classic_loop_aims_later_micro_batches_with_earlier_gradients():
    """The imperative recipe without zero_grad aims micro-batch 2's attack with ∇(1)+∇(2); advfunc does not."""
    model = tiny_model("bert")
    micro = micro_batches()
    expected, _ = accumulate(advfunc.fgm(model, epsilon=1.0), advfunc.params_of(model), micro)

    def classic_accumulation(own_gradient: bool) -> dict[str, torch.Tensor]:
        copy_ = copy.deepcopy(model)
        fgm = FGM(copy_, EMBEDDING_NAME["bert"], epsilon=1.0)
        total = {n: torch.zeros_like(p) for n, p in copy_.named_parameters()}
        for batch in micro:
            if own_gradient:
                copy_.zero_grad(set_to_none=True)
            copy_(**batch).loss.backward()
            fgm.attack()
            copy_(**batch).loss.backward()
            fgm.restore()
            if own_gradient:
                total = {n: total[n] + p.grad for n, p in copy_.named_parameters()}
        return total if own_gradient else {n: p.grad for n, p in copy_.named_parameters()}

    assert_grads_match(expected, classic_accumulation(own_gradient=True), "own gradient per micro-batch")
    naive = classic_accumulation(own_gradient=False)
    a = torch.cat([expected[n].flatten() for n in expected])
    b = torch.cat([naive[n].flatten() for n in expected])
    assert ((a - b).norm() / a.norm()).item() > 1e-3, "the naive recipe should differ measurably"


def test_per_example_attack_over_micro_batches_equals_the_full_batch():
    """FreeLB's norm is per example, so the mean over equal halves is the full-batch step (to round-off)."""
    model = tiny_model("bert")
    step = advfunc.freelb(model, steps=3, lr=0.05)
    params = advfunc.params_of(model)
    batch = padded_batch("bert", batch=4)
    full, _ = step(params, batch)
    halves, _ = accumulate(step, params, split_batch(batch, 2), reduction="mean")
    assert_grads_match(halves, full, "freelb halves vs full batch")


def test_step_arguments_reach_every_micro_batch():
    model = tiny_model("bert")
    step = advfunc.freelb(model, steps=2, lr=0.05, init_mag=0.5)
    params = advfunc.params_of(model)
    micro = micro_batches()
    grads, _ = accumulate(step, params, micro, generator=torch.Generator().manual_seed(3), loss_scale=4.0)
    g = torch.Generator().manual_seed(3)
    one = step(params, micro[0], generator=g, loss_scale=4.0)[0]
    two = step(params, micro[1], generator=g, loss_scale=4.0)[0]
    for name in one:
        torch.testing.assert_close(grads[name], one[name] + two[name], rtol=1e-6, atol=1e-9)


def test_split_batch_cuts_every_batch_tensor_and_shares_the_rest():
    batch = dict(padded_batch("bert", batch=5), output_hidden_states=False)
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2]
    assert all(p["output_hidden_states"] is False for p in parts)
    torch.testing.assert_close(torch.cat([p["labels"] for p in parts]), batch["labels"])


def test_bad_arguments_are_named():
    model = tiny_model("bert")
    step = advfunc.fgm(model)
    params = advfunc.params_of(model)
    batch = padded_batch("bert")
    with pytest.raises(TypeError, match="split_batch"):
        accumulate(step, params, batch)
    with pytest.raises(ValueError, match="empty"):
        accumulate(step, params, [])
    with pytest.raises(ValueError, match="reduction"):
        accumulate(step, params, [batch], reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parts"):
        split_batch(batch, 0)
    with pytest.raises(ValueError, match="parts <= 4"):
        split_batch(batch, 5)
    with pytest.raises(ValueError, match="batch size"):
        split_batch({"input_ids": torch.zeros(4, 3), "labels": torch.zeros(3)}, 2)
