"""Peak memory of one benchmark case.

On CPU the measure is the peak resident set size of a fresh process that runs only that
case (``python -m benchmarks.memory ...``, one subprocess per case): a process's peak
RSS cannot be attributed to one of several cases run in it. After a warm-up call (which
compiles a compiled step) the kernel's high-water mark is reset (``/proc/self/clear_refs``)
so compilation does not count; where that is refused, ``ru_maxrss`` (whole life) is used
and the record says so. On CUDA the measure is ``torch.cuda.max_memory_allocated`` around
the same calls, in the calling process.

Reported in MiB: ``peak`` (the high-water mark over the measured calls, everything the
process holds included), ``base`` (after building the model and batch, before any step)
and ``step`` = peak − base (what training with this implementation adds to the model).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.cases import make_runner
from benchmarks.shapes import SHAPES, Workload, autocast_name, build_model, make_batch, parse_autocast

MARKER = "BENCHMARK_MEMORY "
MIB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class MemoryRecord:
    """Peak memory of one case, MiB. ``source`` says how it was measured."""

    peak_mb: float
    base_mb: float
    step_mb: float
    source: str


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kib = _status_kib("VmRSS")
    if kib is None:  # no procfs: the peak so far is the best available stand-in
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def measure_cpu_in_this_process(
    method: str | None, impl: str, workload: Workload, calls: int, passes_only: bool = False
) -> MemoryRecord:
    """Run the case here and report this process's peak RSS; meant for a fresh process."""
    model = build_model(workload)
    batch = make_batch(workload)
    gc.collect()
    base = _rss_mb()
    run = make_runner(method, impl, model, workload, batch, passes_only)
    run()  # warm-up: compiles a compiled step, allocates a method's persistent state
    model.zero_grad(set_to_none=True)
    gc.collect()
    reset = _reset_high_water_mark()
    for _ in range(calls):
        run()
    hwm = _status_kib("VmHWM") if reset else None
    if hwm is not None:
        peak, source = hwm / 1024, "VmHWM after warm-up"
    else:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss (includes warm-up)"
    return MemoryRecord(round(peak, 1), round(base, 1), round(peak - base, 1), source)


def measure_cuda(method: str | None, impl: str, workload: Workload, calls: int) -> MemoryRecord:
    """Peak ``max_memory_allocated`` of the case in this process (CUDA)."""
    model = build_model(workload)
    batch = make_batch(workload)
    run = make_runner(method, impl, model, workload, batch)
    run()
    record = measure_cuda_runner(run, model, calls)
    del run, model, batch
    gc.collect()
    torch.cuda.empty_cache()
    return record


def measure_cuda_runner(run: Callable[[], None], model: nn.Module, calls: int) -> MemoryRecord:
    """Peak ``max_memory_allocated`` over ``calls`` calls of an already warmed-up case (CUDA).

    ``base`` is what is allocated before them, gradients released: the model's weights,
    the batch, and whatever else the process holds (other cases' state included).
    """
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(calls):
        run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    return MemoryRecord(round(peak / MIB, 1), round(base / MIB, 1), round((peak - base) / MIB, 1), "cuda")


def measure_in_subprocess(
    method: str | None, impl: str, workload: Workload, calls: int, threads: int | None, timeout: float = 1800
) -> MemoryRecord:
    """Spawn ``python -m benchmarks.memory`` for one case and read its record."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--model",
        workload.shape.name,
        "--vocab",
        str(workload.vocab),
        "--batch",
        str(workload.batch),
        "--length",
        str(workload.length),
        "--device",
        workload.device,
        "--precision",
        autocast_name(workload.autocast),
        "--impl",
        impl,
        "--calls",
        str(calls),
    ]
    if method is not None:
        command += ["--method", method]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"memory case {method or 'plain'}/{impl} failed:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise RuntimeError(f"memory case {method or 'plain'}/{impl} printed no record:\n{done.stdout[-2000:]}")
    return MemoryRecord(**json.loads(lines[-1][len(MARKER) :]))


def main(argv: list[str] | None = None) -> MemoryRecord:
    """Measure one case in this process and print its record as a ``MARKER`` line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--vocab", type=int, default=30_522)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (autocast)")
    parser.add_argument("--method", default=None, help="omit for the plain step")
    parser.add_argument("--impl", default="plain")
    parser.add_argument("--calls", type=int, default=2, help="measured calls after one warm-up call")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--passes-only", action="store_true", help="advfunc: the method's passes without Step's checks of the grads"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    workload = Workload(
        SHAPES[args.model], args.vocab, args.batch, args.length, args.device, parse_autocast(args.precision)
    )
    if torch.device(args.device).type == "cuda":
        record = measure_cuda(args.method, args.impl, workload, args.calls)
    else:
        record = measure_cpu_in_this_process(args.method, args.impl, workload, args.calls, args.passes_only)
    print(MARKER + json.dumps(asdict(record)), flush=True)
    return record


if __name__ == "__main__":
    main()
