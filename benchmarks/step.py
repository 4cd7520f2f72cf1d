"""Time every advfunc method against a plain step and its classic imperative implementation.

``python -m benchmarks.step --out benchmarks/results/cpu`` (run from the repository root).
For each workload (shape × vocabulary × batch) it builds one random BERT classifier and,
in one process, interleaves round by round: the plain step, then for each method the
imperative reference (``seed``), advfunc eager and advfunc compiled. Each round times each
case with ``torch.utils.benchmark.Timer.blocked_autorange``; the rounds of a case are
merged and its median is reported as a ratio to the plain step's median, beside the
method's pass-count floor (its forward+backward passes). ``--baseline REV`` adds another
revision's eager step (``benchmarks.baseline``) to the same rounds: "eager / baseline" then says
whether a change made a method slower. Peak memory is measured per case afterwards (CPU: a
fresh process per case). Outputs ``step.json`` and ``step.md`` in ``--out``, both written
atomically.

``--per-method`` (what ``benchmarks/gpu.sh`` runs on a GPU) times each method in its own
interleaved rounds beside its own plain step, measures its memory in the same process, and
rewrites the outputs after each method, so a run stopped by a time limit keeps every method
it finished. Decoder shapes (``--model qwen2-0.5b``) run the decoder methods on a causal LM
with LoRA (``benchmarks.cases.DECODER_METHODS``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch._dynamo
from torch.utils.benchmark import Compare, Measurement, Timer

from advfunc.hf import atomic
from benchmarks.baseline import import_revision
from benchmarks.cases import (
    DECODER_METHODS,
    IMPLS,
    METHODS,
    MethodSpec,
    Runner,
    available_methods,
    case_names,
    make_runner,
    method_specs,
)
from benchmarks.dynamic import VARIANT_KEYS, dynamic_study, rotten_tomatoes_lengths
from benchmarks.memory import MemoryRecord, measure_cuda, measure_cuda_runner, measure_in_subprocess
from benchmarks.report import environment, markdown, print_stdout, write_json
from benchmarks.shapes import (
    CPU_BATCHES,
    GPU_BATCHES,
    SHAPES,
    VOCABS,
    Workload,
    build_model,
    make_batch,
    parse_autocast,
)

# Every compiled step of a process shares the code objects dynamo caches on (one per
# engine function), so several methods and models in one run exceed the default limit
# of 8 cache entries; past it dynamo would silently run eagerly.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Timed:
    """One (method, implementation) of a workload: its rounds merged into one measurement."""

    method: str | None
    title: str
    impl: str
    first_call_s: float  # the first call: a compiled step's compilation
    measurement: Measurement


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _batches(text: str | None, device: str) -> list[tuple[int, int]]:
    if text is None:
        return list(GPU_BATCHES if torch.device(device).type == "cuda" else CPU_BATCHES)
    pairs = []
    for part in _csv(text):
        batch, _, length = part.partition("x")
        pairs.append((int(batch), int(length)))
    return pairs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/local"), help="output directory")
    parser.add_argument("--model", default="minilm", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--vocab", default=str(VOCABS[0]), help=f"comma list of vocabulary sizes, e.g. {VOCABS}")
    parser.add_argument(
        "--batch-length", default=None, help="comma list of BxL (default: 16x64 on CPU, 32x128,32x512 on GPU)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", default=None, help="fp32, bf16 or fp16 autocast (default: fp32 CPU, bf16 GPU)")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma list of {list(METHODS)} (BERT) or {list(DECODER_METHODS)} (decoders); default: all present",
    )
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled implementation")
    parser.add_argument(
        "--baseline", default=None, help="a git revision whose eager steps are timed in the same rounds (impl baseline)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--memory-calls", type=int, default=2, help="measured calls per memory case")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per case and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case before the rounds (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dynamic", action="store_true", help="also run the dynamic sequence-length study")
    parser.add_argument("--dynamic-method", default="pgd", help="method of the dynamic study")
    parser.add_argument(
        "--dynamic-lengths",
        default=None,
        help="comma list of lengths, or 'rt': 8 batches of Rotten Tomatoes snippets (default: 8 in [L/4, L])",
    )
    parser.add_argument("--bucket", type=int, default=16, help="bucket multiple of the dynamic study")
    parser.add_argument(
        "--dynamic-variants",
        default=",".join(VARIANT_KEYS),
        help=f"comma list of {list(VARIANT_KEYS)} (eager always runs: the reference)",
    )
    parser.add_argument(
        "--per-method",
        action="store_true",
        help="time each method in its own rounds beside a plain step; write the outputs after each method",
    )
    parser.add_argument("--note", default=None, help="a line to print at the top of the Markdown report")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first call of a compiled step compiles")
    if args.per_method and (args.baseline or args.dynamic):
        parser.error("--per-method runs neither --baseline nor --dynamic; run those without it")
    return args


def _title(method: str | None, specs: dict[str, MethodSpec]) -> str:
    return "plain" if method is None else specs[method].title


def time_workload(
    workload: Workload,
    methods: list[str],
    impls: list[str],
    args: argparse.Namespace,
    baseline: ModuleType | None = None,
) -> tuple[list[Timed], str]:
    """Time every case of ``workload`` interleaved; returns the cases and the Compare table.

    The model, the steps and their compiled graphs are released on return.
    """
    model = build_model(workload)
    batch = make_batch(workload)
    pairs = list(case_names(methods, impls, workload, baseline))
    runs: list[Runner] = [
        make_runner(method, impl, model, workload, batch, baseline=baseline) for method, impl in pairs
    ]
    return time_runs(workload, pairs, runs, args)


def time_runs(
    workload: Workload, pairs: list[tuple[str | None, str]], runs: list[Runner], args: argparse.Namespace
) -> tuple[list[Timed], str]:
    """Warm up each of ``runs`` (timing its first call), then time them in interleaved rounds."""
    specs = method_specs(workload)
    titles = [_title(method, specs) for method, _ in pairs]
    first_call = []
    for (_, impl), title, run in zip(pairs, titles, runs, strict=True):
        print(f"  warm-up {title}/{impl}", flush=True)
        _synchronize(workload.device)
        start = time.perf_counter()
        run()  # a compiled step compiles here
        _synchronize(workload.device)
        first_call.append(time.perf_counter() - start)
        for _ in range(args.warmup - 1):
            run()
    threads = torch.get_num_threads()
    rounds: list[list[Measurement]] = [[] for _ in pairs]
    order = list(range(len(pairs)))
    for round_index in range(args.repeats):
        # Rotating the order keeps drift (thermal, other load) from favouring one case.
        shift = round_index % len(order)
        for index in order[shift:] + order[:shift]:
            timer = Timer(
                stmt="run()",
                globals={"run": runs[index]},
                label=workload.label,
                sub_label=titles[index],
                description=pairs[index][1],
                num_threads=threads,  # Timer's default is 1 thread
            )
            rounds[index].append(timer.blocked_autorange(min_run_time=args.min_run_time))
        print(f"  round {round_index + 1}/{args.repeats} done", flush=True)
    timed = [
        Timed(method, title, impl, first, Measurement.merge(measured)[0])
        for (method, impl), title, first, measured in zip(pairs, titles, first_call, rounds, strict=True)
    ]
    plain = timed[0].measurement.median
    for case in timed:
        median = case.measurement.median
        print(
            f"  {case.title}/{case.impl}: {median * 1e3:.2f} ms median, {median / plain:.2f}x plain, "
            f"{workload.batch * workload.length / median:,.0f} tokens/s, first call {case.first_call_s:.1f} s",
            flush=True,
        )
    return timed, str(Compare([t.measurement for t in timed]))


def _rows(
    workload: Workload, cases: list[Timed], memory: dict[tuple[str | None, str], MemoryRecord]
) -> list[dict[str, Any]]:
    plain = cases[0].measurement
    specs = method_specs(workload)
    rows = []
    for case in cases:
        merged = case.measurement
        spec = specs.get(case.method or "")
        record = memory.get((case.method, case.impl))
        rows.append(
            {
                "method": case.method or "plain",
                "title": case.title,
                "impl": case.impl,
                "median_ms": merged.median * 1e3,
                "iqr_ms": merged.iqr * 1e3,
                # On a loaded machine the fastest run is the least disturbed one.
                "min_ms": min(merged.times) * 1e3,
                "min_ratio": min(merged.times) / min(plain.times),
                "runs": len(merged.times),
                "ratio": merged.median / plain.median,
                # Every position of the batch, padding included: the shape the step computes on.
                "tokens_per_s": workload.batch * workload.length / merged.median,
                "first_call_s": case.first_call_s,
                "floor": spec.floor.text if spec else "1 full",
                "floor_passes": spec.floor.passes if spec else 1,
                "floor_estimate": spec.floor.estimate if spec else 1.0,
                "floor_detail": asdict(spec.floor) if spec else {"full": 1, "delta_only": 0, "forward_only": 0},
                "hyper": spec.hyper if spec else {},
                "memory": asdict(record) if record else None,
            }
        )
    return rows


def measure_memory(
    workload: Workload, pairs: list[tuple[str | None, str]], args: argparse.Namespace
) -> dict[tuple[str | None, str], MemoryRecord]:
    """Peak memory of every case (CPU: one fresh process each)."""
    records = {}
    for method, impl in pairs:
        print(f"  memory {method or 'plain'}/{impl}", flush=True)
        if torch.device(workload.device).type == "cuda":
            records[(method, impl)] = measure_cuda(method, impl, workload, args.memory_calls)
        else:
            records[(method, impl)] = measure_in_subprocess(method, impl, workload, args.memory_calls, args.threads)
    return records


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write ``step.json`` and ``step.md`` into ``--out``; return the JSON payload."""
    argv = list(argv) if argv is not None else None
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    autocast = parse_autocast(args.precision or ("bf16" if on_gpu else "fp32"))
    impls = [i for i in _csv(args.impls) if not (args.no_compile and i == "compiled")]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown impls {unknown}; known: {list(IMPLS)} (and baseline, with --baseline)")
    baseline = import_revision(args.baseline) if args.baseline else None
    if baseline is not None:
        impls.append("baseline")
    models = _csv(args.model)
    unknown_models = sorted(set(models) - set(SHAPES))
    if unknown_models:
        raise ValueError(f"unknown models {unknown_models}; known: {sorted(SHAPES)}")
    families = {SHAPES[name].decoder for name in models}
    if len(families) > 1:
        raise ValueError(f"--model {args.model} mixes BERT and decoder shapes; run one family per process")
    specs = method_specs(Workload(SHAPES[models[0]], 0, 0, 0, device, autocast))
    methods, missing = available_methods(_csv(args.methods) if args.methods else None, specs)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never report an eager run as compiled

    settings = {
        "repeats": args.repeats,
        "min_run_time": args.min_run_time,
        "warmup": args.warmup,
        "impls": ["plain", *impls],
        "methods": methods,
        "memory": not args.no_memory,
        "memory_calls": args.memory_calls,
        "per_method": args.per_method,
    }
    payload: dict[str, Any] = {
        "meta": environment(device, argv if argv is not None else sys.argv[1:], settings),
        "note": args.note,
        "workloads": [],
        "dynamic": None,
        "skipped": [f"{m}: advfunc has no such method in this checkout" for m in missing],
    }
    for name in models:
        for vocab in (int(v) for v in _csv(args.vocab)):
            for batch, length in _batches(args.batch_length, device):
                workload = Workload(SHAPES[name], vocab, batch, length, device, autocast)
                print(f"{workload.label}", flush=True)
                if args.per_method:
                    time_per_method(workload, methods, impls, args, payload)
                    continue
                torch._dynamo.reset()
                cases, compare = time_workload(workload, methods, impls, args, baseline)
                gc.collect()
                # A fresh process cannot import the baseline: its memory is not measured.
                pairs = [(case.method, case.impl) for case in cases if case.impl != "baseline"]
                memory = {} if args.no_memory else measure_memory(workload, pairs, args)
                payload["workloads"].append(
                    {
                        "workload": workload.describe(),
                        "label": workload.label,
                        "rows": _rows(workload, cases, memory),
                        "compare": compare,
                    }
                )
                print_stdout(compare)
    if args.dynamic:
        name, vocab = _csv(args.model)[0], int(_csv(args.vocab)[0])
        batch, length = _batches(args.batch_length, device)[0]
        workload = Workload(SHAPES[name], vocab, batch, length, device, autocast)
        if args.dynamic_lengths == "rt":
            lengths: list[int] | None = rotten_tomatoes_lengths(batch, 8, length)
        else:
            lengths = [int(v) for v in _csv(args.dynamic_lengths)] if args.dynamic_lengths else None
        torch._dynamo.reset()
        payload["dynamic"] = dynamic_study(
            workload, args.dynamic_method, lengths, args.bucket, tuple(_csv(args.dynamic_variants))
        )
    text = write_outputs(args.out, payload)
    print_stdout(text)
    return payload


def write_outputs(out: Path, payload: dict[str, Any]) -> str:
    """Write ``step.json`` and ``step.md`` into ``out``; return the Markdown."""
    text = markdown(payload)
    write_json(out / "step.json", payload)
    atomic.write_text(out / "step.md", text)
    return text


def time_per_method(
    workload: Workload, methods: list[str], impls: list[str], args: argparse.Namespace, payload: dict[str, Any]
) -> None:
    """Each method in its own interleaved rounds beside the plain step, outputs rewritten after each.

    One model and batch serve every method; the plain step is timed again in each method's
    rounds, so each ratio is to a plain step measured minutes apart at most. Methods not yet
    finished are listed in ``payload["skipped"]`` until they finish, so the files a run
    stopped by a time limit leaves say what is missing. A method that raises is recorded
    there with its error and the others still run; the run then raises at its end. Memory
    (CUDA: in this process, after the rounds) per case.
    """
    model = build_model(workload)
    batch = make_batch(workload)
    on_gpu = torch.device(workload.device).type == "cuda"
    group: dict[str, Any] = {"workload": workload.describe(), "label": workload.label, "rows": [], "compare": ""}
    payload["workloads"].append(group)
    failed: list[str] = []
    done_before = list(payload["skipped"])
    for index, method in enumerate(methods):
        pending = [f"{m} ({workload.label}): not finished (the run stopped first)" for m in methods[index:]]
        payload["skipped"] = done_before + failed + pending
        write_outputs(args.out, payload)
        print(f" {method}", flush=True)
        torch._dynamo.reset()
        pairs = [(None, "plain"), *[pair for pair in case_names([method], impls, workload) if pair[0] is not None]]
        try:
            runs = [make_runner(m, impl, model, workload, batch) for m, impl in pairs]
            cases, compare = time_runs(workload, pairs, runs, args)
            memory: dict[tuple[str | None, str], MemoryRecord] = {}
            if not args.no_memory:
                for pair, run in zip(pairs, runs, strict=True):
                    if on_gpu:
                        memory[pair] = measure_cuda_runner(run, model, args.memory_calls)
                    else:
                        memory[pair] = measure_in_subprocess(*pair, workload, args.memory_calls, args.threads)
                    print(f"  {pair[0] or 'plain'}/{pair[1]}: peak {memory[pair].peak_mb:,.0f} MiB", flush=True)
        except Exception as error:  # one broken method must not cost the others' results
            traceback.print_exc()
            failed.append(f"{method} ({workload.label}): failed: {type(error).__name__}: {error}"[:2000])
            model.zero_grad(set_to_none=True)
        else:
            group["rows"] += _rows(workload, cases, memory)
            group["compare"] += compare + "\n"
        runs = []
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    payload["skipped"] = done_before + failed
    write_outputs(args.out, payload)
    if failed:
        raise RuntimeError("methods failed (their errors are in the outputs' 'Not run'): " + "; ".join(failed))


if __name__ == "__main__":
    main()
