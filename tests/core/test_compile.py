"""The compiled path: PGD's passes trace with ``fullgraph=True``, match eager, never recompile on new data.

Compiling on CPU costs tens of seconds per graph, so one compiled PGD step (clean pass,
δ-only inner step, adversarial pass) is built once per module and shared by the tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import advfunc
from benchmarks.shapes import pad_to_bucket
from tests.support.method_harness import sharpened
from tests.support.parity import assert_grads_match
from tests.support.tiny_models import padded_batch, tiny_model

pytestmark = pytest.mark.slow

# steps=3 runs the compiled inner (δ-only) step twice per call; epsilon < K·alpha makes
# the projection active.
PGD = {"epsilon": 0.5, "alpha": 0.3, "steps": 3}


@pytest.fixture(scope="module")
def pgd():
    """An eager and a compiled PGD step on one tiny BERT, the compiled one warmed up."""
    torch._dynamo.reset()  # other modules' compiled steps would count against the cache limit
    model = tiny_model("bert")
    eager = advfunc.pgd(model, **PGD, compile=False)
    compiled = advfunc.pgd(model, **PGD, compile=True)
    params = advfunc.params_of(model)
    warm = padded_batch("bert", seed=0)
    # transformers sets config.problem_type on the first forward; a compiled first call
    # would see it change and recompile once. Let the eager step make that first call.
    expected = eager(params, warm)
    got = compiled(params, warm)
    yield SimpleNamespace(
        model=model,
        eager=eager,
        compiled=compiled,
        params=params,
        warm=warm,
        expected=expected,
        got=got,
        graphs=counters["stats"]["unique_graphs"],
    )
    torch._dynamo.reset()


def assert_steps_agree(got, expected, where):
    (grads, out), (grads_eager, out_eager) = got, expected
    assert_grads_match(grads, grads_eager, where=where)
    torch.testing.assert_close(out.delta, out_eager.delta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, out_eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.adv_loss, out_eager.adv_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.delta_tokens, out_eager.delta_tokens)
    assert bool(out.skipped) == bool(out_eager.skipped) is False


def test_compiled_pgd_traces_fullgraph_and_matches_eager(pgd):
    # fullgraph=True turns any graph break into an error, so getting here means the clean
    # pass, the inner δ-only step and the adversarial pass each traced as one graph.
    assert pgd.graphs >= 3
    assert not counters["graph_break"]
    assert_steps_agree(pgd.got, pgd.expected, "compiled vs eager, warm-up batch")
    assert float(pgd.got[1].delta.norm()) == pytest.approx(PGD["epsilon"], rel=1e-4)  # projected onto the ball


def test_no_recompilation_when_only_the_data_changes(pgd):
    torch._dynamo.config.error_on_recompile = True
    try:
        for seed in (1, 2, 3):
            batch = padded_batch("bert", seed=seed)
            for key in ("input_ids", "attention_mask", "labels"):
                assert batch[key].shape == pgd.warm[key].shape
                assert not torch.equal(batch[key], pgd.warm[key]), f"{key} must change for the test to mean anything"
            got = pgd.compiled(pgd.params, batch)
            assert_steps_agree(got, pgd.eager(pgd.params, batch), f"batch seed {seed}")
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == pgd.graphs


def test_lengths_bucketed_to_the_compiled_length_reuse_its_graphs(pgd):
    """Varying lengths meet a static compiled step through buckets: padded up, they add no graph.

    Extra padding columns (id = padding_idx, mask 0) change no loss or gradient, so the
    compiled step on the bucketed batch equals the eager step on the exact one.
    """
    bucket = pgd.warm["input_ids"].shape[1]
    torch._dynamo.config.error_on_recompile = True
    try:
        for seed, length in ((4, 5), (5, 8), (6, 11)):
            exact = padded_batch("bert", length=length, seed=seed)
            bucketed = pad_to_bucket(exact, bucket)
            assert bucketed["input_ids"].shape == pgd.warm["input_ids"].shape
            (grads, out), (grads_eager, out_eager) = pgd.compiled(pgd.params, bucketed), pgd.eager(pgd.params, exact)
            assert_grads_match(grads, grads_eager, where=f"length {length} bucketed to {bucket}")
            torch.testing.assert_close(out.adv_loss, out_eager.adv_loss, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == pgd.graphs


def test_a_second_bucket_compiles_once_and_then_no_length_adds_a_graph(pgd):
    """Graphs are bounded by the buckets: after one batch of a second bucket, lengths in either add none.

    Exact lengths would not be: inside ``torch.func.grad`` dynamo specialises the sequence
    length (at ``F.linear`` and the attention), so each new length compiles again, with
    automatic dynamic shapes or ``dynamic=True`` alike (``python -m benchmarks.step --dynamic``).
    """
    bucket = pgd.warm["input_ids"].shape[1]
    pgd.compiled(pgd.params, pad_to_bucket(padded_batch("bert", length=bucket + 5, seed=7), bucket))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.config.error_on_recompile = True
    try:
        for seed, length in ((8, 2 * bucket - 1), (9, 4), (10, bucket + 1), (11, bucket)):
            exact = padded_batch("bert", length=length, seed=seed)
            bucketed = pad_to_bucket(exact, bucket)
            (grads, out), (grads_eager, out_eager) = pgd.compiled(pgd.params, bucketed), pgd.eager(pgd.params, exact)
            assert_grads_match(grads, grads_eager, where=f"length {length} bucketed to a multiple of {bucket}")
            torch.testing.assert_close(out.adv_loss, out_eager.adv_loss, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_step_past_dynamos_recompile_limit_says_why_and_what_to_do(pgd):
    """fullgraph=True cannot fall back to eager at the recompile limit; the error names the lengths and the fix."""
    new_length = padded_batch("bert", length=7, seed=12)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(ValueError, match="pad_to_multiple_of=16"):
        pgd.compiled(pgd.params, new_length)


@pytest.mark.parametrize("method", ["awp", "vat"])
def test_compile_means_the_same_for_every_method(method):
    """AWP's and VAT's δ-only loops compile too, and the compiled step equals the eager one."""
    torch._dynamo.reset()
    # VAT's KL gradient on a random tiny BERT is round-off unless its head is sharpened.
    model = tiny_model("bert") if method == "awp" else sharpened(tiny_model("bert"))
    params, batch = advfunc.params_of(model), padded_batch("bert", seed=5)
    if method == "awp":
        make = lambda compile: advfunc.awp(model, adv_steps=2, compile=compile)  # noqa: E731
        call = lambda step: step(params, batch)  # noqa: E731
    else:
        # ξ = 1 keeps the KL gradient of the power iteration well above float32 round-off.
        make = lambda compile: advfunc.vat(model, epsilon=0.5, xi=1.0, compile=compile)  # noqa: E731
        call = lambda step: step(params, batch, generator=torch.Generator().manual_seed(1))  # noqa: E731
    eager, compiled = make(False), make(True)
    expected = call(eager)  # the eager call sets config.problem_type first
    counters.clear()
    got = call(compiled)
    assert counters["stats"]["unique_graphs"] >= 1, "the δ-only loop should have compiled"
    assert not counters["graph_break"]
    assert_grads_match(got[0], expected[0], where=f"{method} compiled vs eager")
    delta, delta_eager = got[1].delta, expected[1].delta
    for key in delta if isinstance(delta, dict) else [None]:
        a = delta if key is None else delta[key]
        b = delta_eager if key is None else delta_eager[key]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
