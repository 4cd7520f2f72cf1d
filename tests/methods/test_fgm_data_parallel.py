"""FGM over data-parallel shards: what R processes compute, checked by hand against the global batch's step.

Each process runs the step on its shard and the grads are averaged (``all_reduce_grads``).
A per-example perturbation (``target="embeds"``) normalises each example's gradient alone,
so the shards' mean is the global batch's step. The whole-matrix perturbation
(``target="weight"``, FGM's default) is one δ for the whole batch, ε G / ‖G‖ with G the
embedding-matrix gradient of the mean loss: each process takes G, and so δ, from its
shard alone, which is a different step from the global batch's.
"""

from __future__ import annotations

import pytest
import torch

import advfunc
from tests.support.tiny_models import padded_batch, tiny_model

EPSILON = 0.5
EMBEDDING = "bert.embeddings.word_embeddings.weight"


def _hand_fgm_on_the_matrix(model, params, batch):
    """∇θ L(θ) + ∇θ L(θ; W + ε G/‖G‖), G = ∂L/∂W: Miyato et al.'s step on the embedding matrix, written out."""

    def loss(values):
        return torch.func.functional_call(model, values, args=(), kwargs=batch).loss

    clean = torch.func.grad(loss)(params)
    r = EPSILON * clean[EMBEDDING] / clean[EMBEDDING].norm()
    adversarial = torch.func.grad(loss)({**params, EMBEDDING: params[EMBEDDING] + r})
    return {name: clean[name] + adversarial[name] for name in params}


def _gap(a, b) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.parametrize("target", ["weight", "embeds"])
def test_two_shards_average_to_each_shards_own_fgm_step(target):
    model = tiny_model("bert", num_labels=2).eval()
    params = {name: value.detach() for name, value in advfunc.params_of(model).items()}
    batch = padded_batch("bert", batch=16, length=10, seed=5, num_labels=2)
    shards = [{k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}]
    step = advfunc.fgm(model, epsilon=EPSILON, target=target, compile=False)
    whole = step(params, batch)[0]
    per_shard = [step(params, shard)[0] for shard in shards]
    mean = {name: (per_shard[0][name] + per_shard[1][name]) / 2 for name in whole}  # what all_reduce_grads gives
    if target == "embeds":
        torch.testing.assert_close(mean, whole, rtol=1e-5, atol=1e-7)
        return
    by_hand = [_hand_fgm_on_the_matrix(model, params, shard) for shard in shards]
    torch.testing.assert_close(mean, {n: (by_hand[0][n] + by_hand[1][n]) / 2 for n in mean}, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(whole, _hand_fgm_on_the_matrix(model, params, batch), rtol=1e-5, atol=1e-7)
    assert _gap(mean, whole) > 1e-3  # one δ per shard is not the global batch's δ
