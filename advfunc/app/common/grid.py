"""The run grid: every (seed, method) run of a comparison, resumable run by run.

Each finished run is a JSON file ``OUTPUT/runs/{method}-seed{seed}.json`` holding its key
(everything that decides its numbers); a later invocation skips the runs whose key matches.
The report is rewritten after every run, so a killed comparison keeps what it finished.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advfunc.app.common import report
from advfunc.app.common.flags import COUNT, NATURAL
from advfunc.hf import atomic
from advfunc.methods.registry import MethodSpec

log = logging.getLogger("advfunc")
Run = dict[str, Any]


# Run files written before the two jobs shared one report name three fields their own way.
_RENAMED = {
    "eval": {"answer_accuracy": "clean_accuracy", "pgd": "robust"},
    "train": {"time_per_step": "seconds_per_step"},
}


def add_grid_flags(
    parser: Any, *, methods: Sequence[str] | None, seeds: Sequence[int] | None, output: Path | None
) -> None:
    """The grid's flags: methods, seeds, the report folder and ``--stop-after`` (None defaults: the preset's)."""

    def shown(value: Any) -> str:
        text = str(value) if isinstance(value, Path) else " ".join(map(str, value or ()))
        return f" (default: {text})" if value is not None else " (default: the preset's)"

    parser.add_argument("--methods", nargs="+", default=methods and [*methods], help="method specs" + shown(methods))
    parser.add_argument("--seeds", type=NATURAL, nargs="+", default=seeds and [*seeds], help="seeds" + shown(seeds))
    parser.add_argument("--output", "--out", type=Path, default=output, help="report folder" + shown(output))
    parser.add_argument("--stop-after", type=COUNT, help="stop after N new runs (run the command again to go on)")


def read_run(path: Path) -> Run | None:
    """A finished run's saved JSON object, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    for part, renamed in _RENAMED.items():
        if isinstance(data.get(part), dict):
            data[part] = {renamed.get(key, key): value for key, value in data[part].items()}
    return data


def refuse_repeats(flag: str, shown: Sequence[Any], identities: Sequence[Any]) -> None:
    """Raise ``ValueError`` when two entries of ``flag`` are one run: it would be counted twice."""
    seen: dict[Any, Any] = {}
    for text, identity in zip(shown, identities, strict=True):
        if identity in seen:
            raise ValueError(f"{flag} lists one run twice ({seen[identity]} and {text}); give each once")
        seen[identity] = text


def run_file_name(label: str, seed: int) -> str:
    """``{label}-seed{seed}.json`` with every character a file name might trip on replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=@-]+", "_", label) + f"-seed{seed}.json"


@dataclass
class RunGrid:
    """Seeds × methods, each run once: ``runs = grid.run(one, report)``, with ``one(spec, seed)`` returning
    ``{"train": ..., "eval": ...}`` (None on a process that does not report) and ``key(spec, seed)`` its identity."""

    output: Path
    methods: Sequence[MethodSpec]
    seeds: Sequence[int]
    key: Callable[[MethodSpec, int], Mapping[str, Any]]
    stop_after: int | None = None
    started: int = 0  # runs the last ``run`` started

    def __post_init__(self) -> None:
        refuse_repeats("--seeds", list(self.seeds), list(self.seeds))
        refuse_repeats("--methods", [spec.label for spec in self.methods], [spec.identity for spec in self.methods])
        atomic.require_writable_folder(self.output, "--output")

    @property
    def planned(self) -> int:
        return len(self.methods) * len(self.seeds)

    def run(self, one: Callable[[MethodSpec, int], Run | None], report: Callable[[list[Run]], Any]) -> list[Run]:
        """Every run not done yet, the report after each; the finished runs in grid order."""
        runs: list[Run] = []
        self.started = 0
        for seed, spec in itertools.product(self.seeds, self.methods):
            key = json.loads(json.dumps(self.key(spec, seed)))  # tuples become lists, as in the file
            path = self.output / "runs" / run_file_name(spec.label, seed)
            previous = read_run(path)
            if previous is not None and previous.get("key") == key:
                log.info("%s seed %d: already done (%s)", spec.label, seed, path)
                runs.append(previous)
                continue
            if self.stop_after is not None and self.started >= self.stop_after:
                continue
            log.info("=== %s, seed %d (%d/%d) ===", spec.label, seed, len(runs) + 1, self.planned)
            result = one(spec, seed)
            self.started += 1
            if result is not None:
                run = {"method": spec.label, "seed": seed, "key": key, **result}
                atomic.write_text(path, json.dumps(run, indent=2) + "\n")
                runs.append(run)
                report(runs)
        return runs

    def describe(self, job: str, title: str, argv: Sequence[str], **fields: Any) -> dict[str, Any]:
        """The report's description both jobs share; ``fields`` add the job's own (model, data, task, attack)."""
        shared = {"job": job, "title": title, "command": report.command_line(argv), "machine": report.machine()}
        methods = [spec.label for spec in self.methods]
        return {**shared, "methods": methods, "seeds": list(self.seeds), "planned_runs": self.planned, **fields}

    def run_reported(
        self, one: Callable[[MethodSpec, int], Run | None], info: dict[str, Any], reporting: bool = True
    ) -> list[Run]:
        """``run``, with the report in ``output`` rewritten after each run and, on the ``reporting`` process,
        once at the end; ``info`` (from ``describe``) gains the finished runs and this invocation's minutes."""
        started = time.perf_counter()

        def write(runs: list[Run]) -> list[Path]:
            info.update(finished_runs=len(runs), elapsed_minutes=(time.perf_counter() - started) / 60)
            return report.write(self.output, runs, info)

        runs = self.run(one, write)
        if reporting:
            paths = write(runs)
            log.info("report: %s (%d of %d runs)", ", ".join(map(str, paths)), len(runs), self.planned)
        return runs
