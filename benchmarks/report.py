"""The benchmark's outputs: the run's metadata, Markdown tables and atomic file writes."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from advfunc.hf import atomic


def environment(device: str, argv: Sequence[str], settings: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to trust or reproduce the numbers: machine, versions, date, command."""
    if torch.device(device).type == "cuda":
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
            if names:
                device_name = names[0]
        except OSError:
            pass
    return {
        "device": device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.step", *argv]),
        "settings": settings,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _summary_rows(rows: list[dict[str, Any]], impls: Sequence[str]) -> list[list[Any]]:
    """One line per method: floor, each implementation's ratio, advfunc against the classic implementation."""
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["method"] != "plain":
            by_method.setdefault(row["method"], {})[row["impl"]] = row
    lines = []
    for found in by_method.values():
        first = next(iter(found.values()))
        ratios = [found[i]["ratio"] if i in found else None for i in impls]
        seed = found.get("seed", {}).get("ratio")
        eager = found.get("eager", {}).get("ratio")
        line = [
            first["title"],
            f"{first['floor']} (≈{first['floor_estimate']:.2f})",
            *ratios,
            (eager / seed) if eager is not None and seed else None,
        ]
        if "baseline" in impls:
            previous = found.get("baseline", {}).get("ratio")
            line.append((eager / previous) if eager is not None and previous else None)
        lines.append(line)
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The whole report as Markdown: metadata, then per workload a summary and the details."""
    meta = payload["meta"]
    impls = [i for i in payload["meta"]["settings"]["impls"] if i != "plain"]
    out = [
        "# advfunc step benchmark",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), {meta['num_threads']} threads of "
        f"{meta['cpu_count']} CPUs",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- timing: `torch.utils.benchmark.Timer.blocked_autorange`, {meta['settings']['repeats']} interleaved "
        f"rounds of min_run_time={meta['settings']['min_run_time']} s after {meta['settings']['warmup']} warm-up "
        "call(s); medians. Ratios are to the plain step (forward + `loss.backward()`) of the same run.",
        "- floor: the method's pass count (full = forward+backward with parameter gradients, δ-only = forward + "
        "backward to the perturbation only, fwd-only = forward without backward); in brackets the floor in "
        "plain steps, counting a δ-only pass as 2/3 and a forward-only pass as 1/3 of a plain step "
        "(forward 1 unit, backward 2; with LoRA adapters a δ-only pass counts as a whole plain step, whose "
        "backward then computes little beyond the activation gradients).",
        "",
    ]
    if payload.get("note"):
        out += [f"> {payload['note']}", ""]
    if meta["settings"].get("per_method"):
        out += [
            "- per method: each method's cases were timed in their own interleaved rounds beside a plain step "
            "(so the plain step appears once per method), and its ratios are to that plain step.",
            "",
        ]
    for group in payload["workloads"]:
        w = group["workload"]
        family = ""
        if w.get("family", "bert") != "bert":
            family = f", {w['family']} causal LM with {w['kv_heads']} key/value heads, LoRA adapters trained only"
        out += [
            f"## {w['name']} (layers {w['layers']}, hidden {w['hidden']}, heads {w['heads']}, "
            f"intermediate {w['intermediate']}{family}), vocab {w['vocab']}, batch {w['batch']} × length "
            f"{w['length']}, {w['dtype']}, {w['device']}",
            "",
            "Ratio to the plain step (lower is better):",
            "",
        ]
        against = ["eager / baseline"] if "baseline" in impls else []
        out += _table(["method", "floor", *impls, "eager / seed", *against], _summary_rows(group["rows"], impls))
        out += ["", "Details:", ""]
        detail_rows = [
            [
                row["title"],
                row["impl"],
                row["median_ms"],
                row["iqr_ms"],
                row["min_ms"],
                row["runs"],
                row["ratio"],
                row.get("tokens_per_s"),
                row["first_call_s"],
                (row.get("memory") or {}).get("peak_mb"),
                (row.get("memory") or {}).get("step_mb"),
            ]
            for row in group["rows"]
        ]
        out += _table(
            [
                "method",
                "impl",
                "median ms",
                "IQR ms",
                "min ms",
                "runs",
                "× plain",
                "tokens/s",
                "first call s",
                "peak MiB",
                "step MiB",
            ],
            detail_rows,
        )
        memory_source = {str(row["memory"]["source"]) for row in group["rows"] if row.get("memory")}
        if memory_source:
            out += [
                "",
                f"Memory: {', '.join(sorted(memory_source))}; peak = the whole process's high-water mark "
                "(CPU: RSS of a fresh process per case), step = peak − the model-only baseline.",
            ]
        out += ["", "<details><summary>torch.utils.benchmark Compare</summary>", "", "```", group["compare"], "```"]
        out += ["", "</details>", ""]
    if payload.get("dynamic"):
        out += _dynamic_markdown(payload["dynamic"])
    if payload.get("skipped"):
        out += ["## Not run", ""] + [f"- {line}" for line in payload["skipped"]] + [""]
    return "\n".join(out)


def _dynamic_markdown(study: dict[str, Any]) -> list[str]:
    w = study["workload"]
    out = [
        f"## Dynamic sequence length: {study['title']}, {w['name']}, vocab {w['vocab']}, batch {w['batch']}, "
        f"lengths {study['lengths']}",
        "",
        "First pass: every length once, compilation included; steady: the same batches again.",
        "",
    ]
    rows = [
        [
            v["variant"],
            v["graphs_compiled"],
            v["first_pass_s"],
            v["steady_ms_per_step"],
            v["steady_vs_eager"],
            v["padded_tokens_ratio"],
        ]
        for v in study["variants"]
    ]
    out += _table(
        ["variant", "graphs compiled", "first pass s", "steady ms/step", "steady / eager", "tokens run / real"], rows
    )
    out += ["", study["how"], ""]
    return out


def print_stdout(text: str) -> None:
    """Print without dying on a console that cannot encode δ."""
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.write(text.encode(encoding, errors="replace").decode(encoding))
    sys.stdout.write("\n")
    sys.stdout.flush()
