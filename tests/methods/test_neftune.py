"""NEFTune on a tiny causal LM: the per-sequence noise scale, with padding and with packing."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad

import advfunc
from advfunc import attacks
from advfunc.attacks.neftune import sequence_lengths
from tests.support.method_harness import PassCounter
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_decoders import HIDDEN, tiny_decoder


def completion_batch(padding: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of 12 positions: a prompt, a completion (the only labelled positions), then padding."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [12, 7, 4], [5, 3, 2]
    ids = torch.randint(3, 120, (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    labels = torch.full((3, 12), -100)
    for row, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        span = slice(0, n) if padding == "right" else slice(12 - n, 12)
        mask[row, span] = 1
        start = span.start
        labels[row, start + p : start + n] = ids[row, start + p : start + n]
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _expected_scale(lengths: list[list[int]], alpha: float) -> torch.Tensor:
    """[B, L, 1] α/√(n·d) written out token by token (0 at padding): the oracle."""
    return torch.tensor([[alpha / math.sqrt(n * HIDDEN) if n else 0.0 for n in row] for row in lengths]).unsqueeze(-1)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_the_noise_scale_counts_each_sequence_real_tokens(padding):
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch(padding)
    z = attacks.neftune(model, alpha=5.0)(params, batch, generator=torch.Generator().manual_seed(3))
    uniform = torch.empty(3, 12, HIDDEN).uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
    real = batch["attention_mask"].tolist()
    counts = [sum(row) for row in real]
    expected = uniform * _expected_scale([[counts[b] * m for m in real[b]] for b in range(3)], 5.0)
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=0)
    # A scale from the padded row length (12 for every row) would be too small for the short rows.
    row_scale = 5.0 / math.sqrt(12 * HIDDEN)
    assert float(z[2].abs().max()) > 1.5 * row_scale


def test_packed_sequences_each_get_their_own_scale():
    model = tiny_decoder("llama")
    params = advfunc.params_of(model)
    ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[1] * 8 + [0, 0], [1] * 10])
    batch = {"input_ids": ids * mask, "attention_mask": mask, "position_ids": position_ids, "labels": ids * mask}
    lengths = [[5] * 5 + [3] * 3 + [0, 0], [10] * 10]
    assert sequence_lengths(mask, position_ids).tolist() == lengths
    z = attacks.neftune(model, alpha=10.0)(params, batch, generator=torch.Generator().manual_seed(2))
    uniform = torch.empty(2, 10, HIDDEN).uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(z, uniform * _expected_scale(lengths, 10.0), rtol=1e-6, atol=0)
    # Without the position ids the first row is one sequence of 8.
    unpacked = {k: v for k, v in batch.items() if k != "position_ids"}
    assert sequence_lengths(mask).tolist()[0] == [8] * 8 + [0, 0]
    z_row = attacks.neftune(model, alpha=10.0)(params, unpacked, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(z_row[0, :5], z[0, :5])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_the_step_is_the_loss_gradient_at_the_noise_and_costs_one_pass(padding):
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch(padding, seed=4)
    step = advfunc.neftune(model, alpha=5.0)
    with PassCounter(model) as count:
        grads, out = assert_step_is_pure(
            model, lambda: step(params, batch, generator=torch.Generator().manual_seed(5)), params, batch
        )
    assert count.forwards == count.backwards == step.passes == 1
    z = attacks.neftune(model, alpha=5.0)(params, batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.delta, z)
    loss_at = advfunc.perturbed_loss(model, target="embeds")
    trainable = {n: params[n] for n in advfunc.trainable_names(model)}
    expected = grad(lambda p: loss_at(p, batch, z))(trainable)
    vector = torch.cat([grads[n].flatten() for n in expected])
    oracle = torch.cat([expected[n].flatten() for n in expected])
    assert float((vector - oracle).norm() / oracle.norm()) <= 1e-5
    assert not bool(out.skipped) and bool(torch.isfinite(out.loss))


def test_bad_alpha_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        advfunc.neftune(tiny_decoder("llama"), alpha=0.0)
