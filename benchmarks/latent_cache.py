"""LAT-K's step time over a plain step's, with and without replaying the layers before its target.

A randomly initialised LlamaForCausalLM with SmolLM2-135M's configuration (30 layers,
:data:`benchmarks.checkpointing_memory.SMOLLM2_135M`), fp32, eager, LAT with K δ-only
passes at the middle layer (``model.layers.15``), a batch whose first half is the prompt.
Three steps are timed in each round (wall and process CPU time), in a rotating order, in
one process: the plain step, LAT as advfunc runs it (the δ-only passes replay layers
0..15, :mod:`advfunc.core.prefix`) and LAT with every δ-only pass running the whole model
(the replay turned off). Each
round's LAT times are divided by that round's plain time, so a machine whose load changes
between rounds still gives comparable ratios; the medians over rounds are reported.

    python -m benchmarks.latent_cache                         # CPU: batch 2 × 64, K = 4, 5 rounds
    python -m benchmarks.latent_cache --device cuda --batch 8 --length 256 --steps 8 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import advfunc
from advfunc.core.engine import Engine
from advfunc.methods.plain import plain
from benchmarks.checkpointing_memory import SMOLLM2_135M

# wall: what a user waits; process_cpu: this process's CPU time, which a loaded machine
# inflates far less (one thread: OMP_NUM_THREADS=1).
CLOCKS = ("wall", "process_cpu")


def _batch(size: int, length: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (size, length), generator=g).to(device)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the prompt; the completion after it, and the adversary's:
    adv_labels = torch.where(labels == -100, -100, ids.roll(1, dims=1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "adv_labels": adv_labels}


def _timed(run: Callable[[], Any], device: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(size: int, length: int, steps: int, rounds: int, device: str) -> dict[str, Any]:
    """Seconds per step of each setting per round, and the per-round ratios to the plain step."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device).train()
    params = advfunc.params_of(model)
    batch = _batch(size, length, device)
    plain_batch = {k: v for k, v in batch.items() if k != "adv_labels"}
    plain_step = plain(model)
    lat_step = advfunc.lat(model, epsilon=1.0, alpha=0.5, steps=steps, compile=False)

    def whole_model() -> Any:
        with mock.patch.object(Engine, "prefix_cache", lambda self: None):
            return lat_step(params, batch)

    settings: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain_step(params, plain_batch),
        "lat_replayed": lambda: lat_step(params, batch),
        "lat_whole_model": whole_model,
    }
    for run in settings.values():  # warm-up: allocator, first-call paths
        run()
    names = list(settings)
    seconds: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for clock, value in zip(CLOCKS, _timed(settings[name], device), strict=True):
                seconds[clock][name].append(value)
    return {
        "model": "LlamaForCausalLM, SmolLM2-135M configuration, random weights, fp32, eager",
        "target": list(lat_step.config["layers"]),
        "batch": [size, length],
        "lat_steps": steps,
        "rounds": rounds,
        "device": device,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        **{clock: _summary(seconds[clock]) for clock in CLOCKS},
    }


def _summary(seconds: dict[str, list[float]]) -> dict[str, Any]:
    """Medians over rounds: seconds per step, each LAT's ratio to the same round's plain step, replayed/whole."""

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True))

    return {
        "median_seconds": {name: statistics.median(v) for name, v in seconds.items()},
        "median_ratio_to_plain": {name: paired(name, "plain") for name in seconds if name != "plain"},
        "median_replayed_over_whole": paired("lat_replayed", "lat_whole_model"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="LAT's K")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    result = measure(args.batch, args.length, args.steps, args.rounds, args.device)
    text = json.dumps(result, indent=2)
    if args.output is not None:
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(text + "\n")
        partial.replace(args.output)
    print(text)


if __name__ == "__main__":
    main()
