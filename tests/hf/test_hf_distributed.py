"""``AdversarialTrainer`` on two gloo processes (torchrun, DDP) against one process on the same global batches.

The ranks run tests/hf_distributed_worker.py under ``torch.distributed.run`` (tests/torchrun.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests import hf_distributed_worker as worker
from tests.support.torchrun import ROOT, run_torchrun

pytest.importorskip("accelerate")  # Trainer needs it

WORLD = 2
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank saved: {method: {"weights", "calls", "buckets", "resumed", ...}}."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("hf_ranks")
    run_torchrun(ROOT / "tests" / "hf_distributed_worker.py", str(out), processes=WORLD, timeout_s=TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, micro-batches of both ranks' size together: the same global batch per optimizer step."""
    out = tmp_path_factory.mktemp("hf_single")
    weights = {}
    for method in worker.METHODS:
        trainer = worker.train(method, worker.arguments(out / method, method, WORLD * worker.PER_PROCESS))
        weights[method] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("method", list(worker.METHODS))
def test_two_processes_train_like_one_on_the_global_batch(ranks, single, method):
    start = {n: p.detach() for n, p in worker.tiny_model("bert", num_labels=2).named_parameters()}
    want = single[method]
    moved = max(float((want[n] - start[n]).abs().max()) for n in want)
    assert moved > 1e-4, "the reference did not train"
    for r, result in enumerate(ranks):
        assert result[method]["world"] == WORLD
        got = result[method]["weights"]
        assert list(got) == list(want)
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}"
            )


@pytest.mark.slow
@pytest.mark.parametrize("method", list(worker.METHODS))
def test_one_all_reduce_per_bucket_per_optimizer_step(ranks, method):
    """The count spans every micro-batch of the step, the attacks' inner passes included."""
    for result in ranks:
        record = result[method]
        assert len(record["calls"]) == worker.max_steps(method)
        assert 1 < record["buckets"] < record["tensors"]
        assert record["calls"] == [record["buckets"]] * worker.max_steps(method)


@pytest.mark.slow
@pytest.mark.parametrize("method", worker.RESUMED)
def test_resuming_a_checkpoint_on_two_processes_continues_the_run(ranks, method):
    for r, result in enumerate(ranks):
        for name, value in result[method]["weights"].items():
            torch.testing.assert_close(result[method]["resumed"][name], value, rtol=0, atol=0, msg=f"rank {r} {name}")
