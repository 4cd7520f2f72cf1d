"""Where a step's time goes: ``torch.profiler`` top-ops tables, a plain step beside a method.

``python -m benchmarks.profile --method pgd --impl eager --out benchmarks/results/profile``
profiles ``--calls`` calls of the plain step and of the chosen implementation on the same
model and batch, after a warm-up call each, and writes (and prints) per implementation the
profiler's top ops by self time, plus one comparison table: each op's self time per step
in the plain step and in the method, and their ratio. Against the method's pass-count
floor, the ops whose ratio exceeds it are the method's overhead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from advfunc.hf import atomic
from benchmarks.cases import IMPLS, METHODS, make_runner
from benchmarks.report import print_stdout
from benchmarks.shapes import SHAPES, Workload, build_model, make_batch, parse_autocast


def _profile(run: Any, calls: int, device: str) -> Any:
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    run()  # warm-up (compiles a compiled step)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    return prof


def _self_times_ms(prof: Any, calls: int, device: str) -> dict[str, float]:
    on_gpu = torch.device(device).type == "cuda"
    times = {}
    for event in prof.key_averages():
        total = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        times[event.key] = total / 1e3 / calls  # µs over all calls → ms per step
    return times


def comparison(plain: dict[str, float], method: dict[str, float], rows: int) -> str:
    """Markdown table of the ops that take the most self time in the method, per step."""
    names = sorted(method, key=lambda k: method[k], reverse=True)[:rows]
    lines = ["| op | plain ms/step | method ms/step | method / plain |", "|---|---|---|---|"]
    for name in names:
        base = plain.get(name, 0.0)
        ratio = f"{method[name] / base:.2f}" if base > 0 else "new"
        lines.append(f"| `{name}` | {base:.2f} | {method[name]:.2f} | {ratio} |")
    lines.append(
        f"| **total self time** | {sum(plain.values()):.1f} | {sum(method.values()):.1f} | "
        f"{sum(method.values()) / max(sum(plain.values()), 1e-9):.2f} |"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Profile the plain step and ``--method``/``--impl``; returns the text written per file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    parser.add_argument("--model", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--vocab", type=int, default=30_522)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--method", choices=list(METHODS), default="pgd")
    parser.add_argument("--impl", choices=[i for i in IMPLS if i != "plain"], default="eager")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="rows of each table")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    workload = Workload(
        SHAPES[args.model], args.vocab, args.batch, args.length, args.device, parse_autocast(args.precision)
    )
    model = build_model(workload)
    batch = make_batch(workload)
    sort_by = "self_cuda_time_total" if torch.device(args.device).type == "cuda" else "self_cpu_time_total"
    written: dict[str, str] = {}
    times = {}
    for method, impl in ((None, "plain"), (args.method, args.impl)):
        prof = _profile(make_runner(method, impl, model, workload, batch), args.calls, args.device)
        name = "plain" if method is None else f"{method}-{impl}"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows)
        header = f"{workload.label}: {name}, {args.calls} calls, {torch.get_num_threads()} threads\n"
        written[f"profile-{name}.txt"] = header + table
        times[name] = _self_times_ms(prof, args.calls, args.device)
    name = f"{args.method}-{args.impl}"
    written[f"compare-{name}.md"] = (
        f"# {workload.label}: {METHODS[args.method].title} ({args.impl}) vs plain, self time per step, "
        f"floor {METHODS[args.method].floor.text}\n\n" + comparison(times["plain"], times[name], args.rows) + "\n"
    )
    for filename, text in written.items():
        atomic.write_text(args.out / filename, text)
        print_stdout(text)
    return written


if __name__ == "__main__":
    main()
