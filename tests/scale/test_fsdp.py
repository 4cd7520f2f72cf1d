"""FSDP2 (``fully_shard``) on two gloo processes: the step on gathered parameters equals one process's.

The oracle is the same step on an unsharded model, run on each rank's batch and averaged,
then one SGD step; the ranks run tests/scale/fsdp_worker.py under torchrun (tests/support/torchrun.py).
"""

from __future__ import annotations

import pytest
import torch

import advfunc
from tests.scale import fsdp_worker as worker
from tests.support.tiny_decoders import completion_batch
from tests.support.torchrun import ROOT, run_torchrun

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_ranks")
    run_torchrun(ROOT / "tests" / "scale" / "fsdp_worker.py", str(out), processes=WORLD, timeout_s=300)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_sharded_step_and_update_equal_one_process_on_both_batches(ranks, case):
    model, prefix = worker.model_for(case)
    step = worker.CASES[case](model, prefix)
    params = advfunc.params_of(model)
    per_rank = [step(params, completion_batch("right", seed=r))[0] for r in range(WORLD)]
    mean = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
    with torch.no_grad():
        updated = {n: p - worker.LR * mean[n] if n in mean else p for n, p in model.named_parameters()}
    for rank, result in enumerate(ranks):
        record = result[case]
        assert record["world"] == WORLD
        assert sorted(record["grads"]) == sorted(mean)
        for name, value in mean.items():
            torch.testing.assert_close(record["grads"][name], value, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
        for name, value in updated.items():
            torch.testing.assert_close(record["params"][name], value, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")


@pytest.mark.slow
def test_a_step_called_on_sharded_parameters_is_refused_naming_unsharded(ranks):
    for result in ranks:
        for case in worker.CASES:
            record = result[case]
            assert "DTensor" in record["refused"] and "advfunc.scale.fsdp.unsharded" in record["refused"]


@pytest.mark.slow
def test_unsharded_leaves_each_modules_reshard_setting_as_it_was(ranks):
    """A layer sharded with reshard_after_forward=False stays gathered after its forward; a default one does not."""
    for result in ranks:
        assert result["reshard_settings"] == {"0": True, "1": False}
