"""One rank of the two-process gloo checks in tests/scale/test_distributed.py.

Run as ``python tests/scale/distributed_worker.py RANK WORLD STORE_FILE OUT_DIR``; the test
spawns the ranks, bounds them in time and compares what they save to ``OUT_DIR``
with a single-process reference. Each rank trains a tiny BERT with FGM, PGD and FreeLB
on its half of every batch for ``STEPS`` SGD steps, and records the all-reduced grads
and the number of ``all_reduce`` calls each optimizer step made.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import advfunc
from advfunc.scale import distributed as advdist
from advfunc.scale import precision
from advfunc.scale.accumulation import split_batch
from tests.support.tiny_models import padded_batch, tiny_model

STEPS = 2
LR = 0.5
BUCKET_MB = 0.03  # the tiny BERT's 0.09 MiB of grads in 4 buckets, of its 41 tensors
FACTORIES = {
    "fgm": lambda m: advfunc.fgm(m, epsilon=1.0),
    "pgd": lambda m: advfunc.pgd(m, epsilon=1.0, alpha=0.3, steps=3),
    "freelb": lambda m: advfunc.freelb(m, steps=3, lr=0.05),
}


class CountedAllReduce:
    """Stands in for ``torch.distributed.all_reduce`` and counts its calls."""

    def __init__(self) -> None:
        self.original = dist.all_reduce
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def train(method: str, rank: int, world: int, counter: CountedAllReduce) -> dict:
    """STEPS SGD steps of ``method`` on this rank's half of each batch."""
    if method == "pgd":
        # the accelerate/DDP path: wrap (DDP broadcasts rank 0's weights), then unwrap for the step
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_model("bert", seed=rank))
        model = advdist.unwrap(ddp)
    else:
        model = tiny_model("bert", seed=rank)  # ranks start apart on purpose
        advdist.broadcast_parameters(model)
    step = FACTORIES[method](model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    params = advfunc.params_of(model)
    record: dict = {"grads": [], "calls": [], "buckets": [], "tensors": []}
    for t in range(STEPS):
        half = split_batch(padded_batch("bert", batch=4, seed=t), world)[rank]
        counter.calls = 0
        grads, _ = step(params, half)
        reduced = advdist.all_reduce_grads(grads, bucket_mb=BUCKET_MB)
        record["calls"].append(counter.calls)
        record["buckets"].append(len(advdist.plan_buckets(grads, BUCKET_MB)))
        record["tensors"].append(len(grads))
        record["grads"].append({k: v.clone() for k, v in reduced.items()})
        advfunc.set_grads(model, reduced)
        optimizer.step()
    record["in_sync"] = advdist.replicas_agree(params)
    return record


def overflow_on_one_rank(rank: int) -> dict:
    """Rank 1's fp16 grads overflow, rank 0's do not: both must skip and halve the scale."""
    model = tiny_model("bert")
    state = precision.init_loss_scale(2.0**10)
    grads, _ = advfunc.fgm(model, autocast=torch.float16)(
        advfunc.params_of(model), padded_batch("bert", seed=rank), loss_scale=state.scale
    )
    if rank == 1:
        grads = {k: (v * float("inf") if i == 0 else v) for i, (k, v) in enumerate(grads.items())}
    grads, finite, state = precision.unscale_and_check(advdist.all_reduce_grads(grads), state)
    return {
        "finite": bool(finite),
        "scale": float(state.scale),
        "grads_finite": all(bool(g.isfinite().all()) for g in grads.values()),
    }


def zero_redundancy(rank: int) -> bool:
    """ZeRO-1 (optimizer state sharded, parameters whole) applies the all-reduced grads like plain Adam."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    sharded_model, plain_model = tiny_model("bert"), tiny_model("bert")
    sharded = ZeroRedundancyOptimizer(sharded_model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-2)
    step = advfunc.pgd(sharded_model, epsilon=1.0, alpha=0.3, steps=2)
    for t in range(STEPS):
        half = split_batch(padded_batch("bert", batch=4, seed=t), 2)[rank]
        grads = advdist.all_reduce_grads(step(advfunc.params_of(sharded_model), half)[0])
        advfunc.set_grads(sharded_model, grads)
        advfunc.set_grads(plain_model, grads)
        sharded.step()
        plain.step()
    return all(
        torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(sharded_model.parameters(), plain_model.parameters(), strict=True)
    )


def fsdp_refused() -> str:
    """An FSDP2-sharded model is refused by the factories (else its grads would silently be zero)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return "no fully_shard in this torch"
    model = tiny_model("bert")
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    try:
        advfunc.freelb(model, steps=2)
    except TypeError as error:
        return f"refused: {error}"
    return "accepted"


def main() -> None:
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counter = CountedAllReduce()
    dist.all_reduce = counter
    try:
        results = {method: train(method, rank, world, counter) for method in FACTORIES}
        results["overflow"] = overflow_on_one_rank(rank)
        results["zero1"] = zero_redundancy(rank)
        results["fsdp2"] = fsdp_refused()
    finally:
        dist.all_reduce = counter.original
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
