"""Two gloo processes on CPU: the all-reduced grads equal one process's average of the halves.

The ranks run tests/scale/distributed_worker.py (spawned here, bounded in time, killed by pid
on failure); a single-process reference computes each half's step and averages them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import advfunc
from advfunc.scale import distributed as advdist
from advfunc.scale.accumulation import split_batch
from tests.scale import distributed_worker as worker
from tests.support.tiny_models import padded_batch, tiny_model
from tests.support.torchrun import run_torchrun

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT_S = 150

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saved: {method: record, "overflow": ..., "zero1": ..., "fsdp2": ...}."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ranks")
    store = out / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "scale" / "distributed_worker.py"),
                str(r),
                str(WORLD),
                str(store),
                str(out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gloo ranks did not finish in {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference(method: str) -> list[dict[str, torch.Tensor]]:
    """One process: each half's step, averaged, applied with SGD, for the same steps as the ranks."""
    model = tiny_model("bert")
    step = worker.FACTORIES[method](model)
    optimizer = torch.optim.SGD(model.parameters(), lr=worker.LR)
    params = advfunc.params_of(model)
    averaged = []
    for t in range(worker.STEPS):
        halves = split_batch(padded_batch("bert", batch=4, seed=t), WORLD)
        each = [step(params, half)[0] for half in halves]
        mean = {k: sum(g[k] for g in each) / WORLD for k in each[0]}
        averaged.append(mean)
        advfunc.set_grads(model, mean)
        optimizer.step()
    return averaged


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(worker.FACTORIES))
def test_all_reduced_grads_equal_the_average_of_the_halves(ranks, method):
    expected = reference(method)
    for r, result in enumerate(ranks):
        for t, (got, want) in enumerate(zip(result[method]["grads"], expected, strict=True)):
            assert list(got) == list(want), f"rank {r} step {t}: names or order differ"
            for name in want:
                torch.testing.assert_close(
                    got[name],
                    want[name],
                    rtol=1e-5,
                    atol=1e-8,
                    msg=lambda m, n=name, r=r, t=t: f"rank {r} step {t} {n}: {m}",
                )
    for t in range(worker.STEPS):
        first, second = (result[method]["grads"][t] for result in ranks)
        assert all(torch.equal(first[k], second[k]) for k in first), "the ranks got different reduced grads"
    assert all(result[method]["in_sync"] for result in ranks), "replicas drifted apart"


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(worker.FACTORIES))
def test_one_all_reduce_per_bucket_and_none_in_the_ascent(ranks, method):
    """The counter spans the whole step (inner ascent passes included) and the reduction."""
    for result in ranks:
        record = result[method]
        assert record["calls"] == record["buckets"], (record["calls"], record["buckets"])
        assert all(1 < b < n for b, n in zip(record["buckets"], record["tensors"], strict=True))


@pytest.mark.slow
def test_an_overflow_on_one_rank_skips_the_update_on_all(ranks):
    for result in ranks:
        assert result["overflow"] == {"finite": False, "scale": 2.0**9, "grads_finite": True}


@pytest.mark.slow
def test_zero1_optimizer_sharding_applies_the_reduced_grads(ranks):
    assert all(result["zero1"] for result in ranks)


@pytest.mark.slow
def test_fsdp2_model_is_refused(ranks):
    for result in ranks:
        if result["fsdp2"].startswith("no fully_shard"):
            pytest.skip(result["fsdp2"])
        assert result["fsdp2"].startswith("refused:"), result["fsdp2"]
        assert "sharded parameters" in result["fsdp2"]


def test_plan_buckets_bounds_size_and_keeps_order():
    grads = {f"t{i}": torch.zeros(1000) for i in range(10)}  # 4000 bytes each
    grads["half"] = torch.zeros(10, dtype=torch.float16)
    plan = advdist.plan_buckets(grads, bucket_mb=12000 / 2**20)
    assert [b.names for b in plan] == [
        ("t0", "t1", "t2"),
        ("t3", "t4", "t5"),
        ("t6", "t7", "t8"),
        ("t9",),
        ("half",),
    ]
    assert [b.numel for b in plan] == [3000, 3000, 3000, 1000, 10]
    big = advdist.plan_buckets({"a": torch.zeros(10), "huge": torch.zeros(10**4), "b": torch.zeros(10)}, 1e-3)
    assert [b.names for b in big] == [("a",), ("huge",), ("b",)]  # a tensor above the cap is a bucket of its own


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_bucket_size_is_named(bad):
    with pytest.raises(ValueError, match="bucket_mb"):
        advdist.plan_buckets({"a": torch.zeros(3)}, bad)
    with pytest.raises(TypeError, match="bucket_mb"):
        advdist.plan_buckets({"a": torch.zeros(3)}, "25")  # type: ignore[arg-type]


def test_collectives_need_a_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match=r"init_process_group|no torch\.distributed"):
        advdist.all_reduce_grads({"a": torch.zeros(3)})


def test_unwrap_peels_wrappers_and_the_step_refuses_a_wrapper():
    model = tiny_model("bert")
    assert advdist.unwrap(torch.nn.DataParallel(model)) is model
    assert advdist.unwrap(model) is model
    with pytest.raises(ValueError, match="unwrap"):
        advfunc.pgd(torch.nn.DataParallel(model))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        advdist.unwrap("model")  # type: ignore[arg-type]


@needs_gloo
@pytest.mark.slow
def test_the_ddp_example_runs_under_torchrun():
    """examples/ddp_train.py, 2 gloo ranks, fp16 with accumulation: exits 0 with replicas in sync."""
    example = ROOT / "examples" / "ddp_train.py"
    options = ["--steps", "3", "--precision", "fp16", "--accumulate", "2", "--method", "pgd", "--bucket-mb", "0.2"]
    log = run_torchrun(example, *options, processes=WORLD, timeout_s=TIMEOUT_S)
    assert "all_reduce calls 2" in log, log[-2000:]
    assert "replicas agree: True" in log, log[-2000:]
