"""The report of a comparison, either job's: ``results.json``, ``results.md`` (mean ± std over seeds) and a plot.

Every file is written atomically (:mod:`advfunc.hf.atomic`); the run grid
rewrites the report after each finished run (:mod:`advfunc.app.common.grid`).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shlex
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from advfunc.hf import atomic

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "accuracy_vs_radius.png"
COST_PNG = "cost_vs_robustness.png"


def command_line(argv: Sequence[str]) -> str:
    """``advfunc ARGS`` as the report records it: without ``--stop-after N``, which only bounds one invocation."""
    bounded = {i for i, word in enumerate(argv) if word == "--stop-after"}
    kept = [w for i, w in enumerate(argv) if not ({i, i - 1} & bounded or w.startswith("--stop-after="))]
    return "advfunc " + shlex.join(kept)


def machine() -> str:
    """The GPU (if any), CPU, cores, torch version, threads and OMP wait policy a run's timings were taken under."""
    gpu = f"{torch.cuda.get_device_name()} GPU, " if torch.cuda.is_available() else ""
    return (
        f"{gpu}{platform.machine()} CPU, {os.cpu_count() or 0} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


_SYNONYM = {  # metric: the synonym attack's summary field
    "synonym": "accuracy_under_attack",
    "synonym_success": "success_rate",
    "synonym_changed": "changed_share",
    "synonym_queries": "queries",
    "synonym_untried": "untried",
}


def _metrics(run: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one run that the table aggregates, flat (a task's own ``measures`` as they are)."""
    evaluation, training = run["eval"], run["train"]
    flat = {
        "clean": evaluation.get("clean_accuracy", math.nan),
        "attack_clean": evaluation.get("attack_clean_accuracy", math.nan),
        "seconds_per_step": training.get("seconds_per_step", math.nan),
        "steps_per_second": training.get("steps_per_second", math.nan),
        "passes": training.get("passes", math.nan),
        "train_minutes": training["seconds"] / 60,
        "eval_minutes": evaluation.get("seconds", math.nan) / 60,
        **{f"pgd@{r}": a for r, a in evaluation.get("robust", {}).items()},
        **{f"hotflip@{b}": a for b, a in evaluation.get("hotflip", {}).items()},
        **evaluation.get("measures", {}),
    }
    if evaluation.get("synonym") is not None:
        synonym = {"untried": 0.0, **evaluation["synonym"]}  # run files from before the untried count
        flat.update({key: synonym[field] for key, field in _SYNONYM.items()})
    if evaluation.get("worst_case") is not None:
        flat["worst_case"] = evaluation["worst_case"]
    if run.get("validation_accuracy") is not None:
        flat["validation"] = run["validation_accuracy"]
    return flat


Stats = dict[str, float]
Column = tuple[str, str, int]  # (title, metric, digits)


def _aggregate(rows: Iterable[tuple[str, Mapping[str, float]]]) -> dict[str, dict[str, Stats]]:
    """{method: {metric: {mean, std, n}}} of the finite values; std is the sample standard deviation (0 for one)."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for method, values in rows:
        found = grouped.setdefault(method, {})
        for key, value in values.items():
            if math.isfinite(value):
                found.setdefault(key, []).append(value)
    return {
        method: {
            key: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for key, v in found.items()
        }
        for method, found in grouped.items()
    }


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Stats]]:
    """{method: {metric: {mean, std, n}}} of each run's metrics over the seeds."""
    return _aggregate((run["method"], _metrics(run)) for run in runs)


def differences(runs: Sequence[Mapping[str, Any]], plain: str = "none") -> dict[str, dict[str, Stats]]:
    """{method: {metric: {mean, std, n}}} of (method − ``plain``) over the seeds both ran: paired by seed (same
    data order, initialisation and split), the spread is that of the difference itself."""
    by_seed = {run["seed"]: _metrics(run) for run in runs if run["method"] == plain}
    return _aggregate(
        (run["method"], {key: value - reference[key] for key, value in _metrics(run).items() if key in reference})
        for run in runs
        if run["method"] != plain and (reference := by_seed.get(run["seed"])) is not None
    )


def cost_points(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{method: {cost, synonym, worst_case, passes, frontier}} over the seeds plain fine-tuning ran too.

    ``cost``: seconds per training step over ``none``'s at the same seed (``none``: 1); ``synonym`` and
    ``worst_case``: accuracy under the synonym attack and over the word-level attacks; ``passes`` per step; each
    {mean, std, n}. On the ``frontier`` when no other method is as cheap and as robust, with one of the two
    strictly better. Methods without the synonym attack's numbers are left out."""
    plain = {run["seed"]: _metrics(run)["seconds_per_step"] for run in runs if run["method"] == "none"}
    paired = _aggregate(
        (
            run["method"],
            {
                "cost": metrics["seconds_per_step"] / plain[run["seed"]],
                **{key: metrics.get(key, math.nan) for key in ("synonym", "worst_case", "passes")},
            },
        )
        for run in runs
        if plain.get(run["seed"], 0) > 0 and "synonym" in (metrics := _metrics(run))
    )
    points: dict[str, dict[str, Any]] = {m: dict(p) for m, p in paired.items() if {"cost", "synonym"} <= set(p)}
    means = {m: (p["cost"]["mean"], p["synonym"]["mean"]) for m, p in points.items()}
    for method, (cost, robust) in means.items():
        beaten = any(c <= cost and r >= robust and (c, r) != (cost, robust) for c, r in means.values())
        points[method]["frontier"] = not beaten
    return {method: points[method] for method in sorted(means, key=means.__getitem__)}


def cell(stats: Mapping[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    """``mean ± std`` of a summary entry (signed if ``signed``; the mean alone for one seed), ``—`` when absent."""
    if stats is None:
        return "—"
    mean = f"{stats['mean']:{'+' if signed else ''}.{digits}f}"
    return mean if stats.get("n", 2) < 2 else f"{mean} ± {stats['std']:.{digits}f}"


_TIME_COLUMNS: list[Column] = [("s / step", "seconds_per_step", 2), ("steps / s", "steps_per_second", 2)]
_UNPAIRED_TAIL: list[Column] = [
    ("synonym acc", "synonym", 3),
    ("synonym success", "synonym_success", 3),
    ("words changed", "synonym_changed", 3),
    ("queries", "synonym_queries", 1),
    ("synonym untried", "synonym_untried", 3),
    ("word worst case", "worst_case", 3),
    *_TIME_COLUMNS,
]


def _columns(info: Mapping[str, Any], paired: bool = False) -> list[Column]:
    """The table's accuracy columns (and, unpaired, the attack and time ones) for the attacks that ran; a task
    that names its own (``info["columns"]``: [title, metric, digits] each) gets those and the time columns."""
    if "columns" in info:
        own = [(str(title), str(metric), int(digits)) for title, metric, digits in info["columns"]]
        return own if paired else own + _TIME_COLUMNS
    budgets = list(range(1, info["attack"]["hotflip_budget"] + 1))
    # Robust accuracy is over the attacked examples: their clean accuracy is its ceiling.
    columns = [("clean" if paired else "clean acc (test)", "clean", 3), ("clean (attacked)", "attack_clean", 3)]
    columns += [(f"PGD r={r}", f"pgd@{r}", 3) for r in info["attack"]["radii"]]
    columns += [(f"HotFlip ≤{b}", f"hotflip@{b}", 3) for b in (budgets[-1:] if paired else budgets)]
    if paired:
        return [*columns, ("synonym acc", "synonym", 3), ("worst case", "worst_case", 3)]
    return columns + _UNPAIRED_TAIL


def _table(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]], columns: list[Column], signed: bool = False
) -> list[str]:
    lines = ["| method | seeds | " + " | ".join(title for title, _, _ in columns) + " |"]
    lines.append("|" + "|".join(["---"] * (len(columns) + 2)) + "|")
    for method, stats in summary.items():
        seeds = max((int(s["n"]) for s in stats.values()), default=0)
        cells = [cell(stats.get(key), digits, signed) for _, key, digits in columns]
        lines.append(f"| `{method}` | {seeds} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _majority_verdict(majority: float, runs: Sequence[Mapping[str, Any]]) -> str:
    """Name the runs at or near the majority class: a model that answers one label everywhere looks robust."""
    clean = {f"`{r['method']}` seed {r['seed']}": r["eval"]["clean_accuracy"] for r in runs}
    stuck = [name for name, accuracy in clean.items() if accuracy <= majority + 0.005]
    weak = [name for name, accuracy in clean.items() if majority + 0.005 < accuracy < majority + 0.1 - 1e-9]
    verdicts = [f"Always answering the most frequent test label scores {majority:.3f}."]
    if stuck:
        verdicts.append(f"At that level (did not learn; their robust accuracy means nothing): {', '.join(stuck)}.")
    if weak:
        verdicts.append(f"Less than 10 points above it: {', '.join(weak)}.")
    if not stuck and not weak and clean:
        verdicts.append(f"Every run is at least 10 points above it (the lowest: {min(clean.values()):.3f}).")
    return " ".join(verdicts)


_ROBUST_READING = (
    "Robust accuracy is over the attacked examples, whose clean accuracy is 'clean (attacked)': it counts an "
    "example as correct only if it is correct clean and survives every attack up to that radius / budget; the "
    "word-level worst case only if it survives every word-level attack that ran (HotFlip at its full budget and "
    "the synonym attack)."
)


def markdown(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    info: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The Markdown report: settings, one row per method, the runs that learned nothing, paired differences."""
    minutes = sum(run["train"]["seconds"] + run["eval"]["seconds"] for run in runs) / 60  # whoever ran them
    lines = [
        f"# advfunc {info.get('job', 'compare')}: {info['title']}",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Model: {info['model']}. Data: {info['data']}. {info['sizes']}",
        *([f"Task: {info['task']}"] if info.get("task") else []),
        f"Training: {info['training']}",
        *([f"Sweep: {info['sweep']}."] if info.get("sweep") else []),
        f"Attacks ({info['attack']['examples']} test examples): {info['attack_text']}",
        f"Finished runs: {info['finished_runs']} of {info['planned_runs']}, {minutes:.1f} min of run time "
        f"(training and evaluation, summed over runs; this invocation {info.get('elapsed_minutes', 0):.1f} min "
        f"wall time). Machine: {info['machine']}.",
        "",
        "Cells are mean ± sample std over seeds (the mean alone for one seed). " + info.get("reading", _ROBUST_READING),
        "",
        *_table(summary, _columns(info)),
    ]
    if info.get("majority_accuracy") is not None and runs:
        lines += [_majority_verdict(info["majority_accuracy"], runs), ""]
    delta = differences(runs)
    if delta:
        lines += ["Difference to plain fine-tuning (`none`), paired by seed: mean ± sample std of (method − none).", ""]
        lines += _table(delta, _columns(info, paired=True), signed=True)
    points = cost_points(runs)
    if "none" in points and len(points) > 1:
        lines += _cost_table(points)
    examples = [(r, e) for r in runs for e in (r["eval"].get("synonym") or {}).get("examples", [])][:5]
    if examples:
        lines += ["Successful synonym substitutions (original → changed, label → prediction):", ""]
        lines += [
            f'- `{run["method"]}` seed {run["seed"]}: "{example["original"]}" → "{example["adversarial"]}" '
            f"({', '.join(example['changes'])}; label {example['label']} → {example['prediction']})"
            for run, example in examples
        ] + [""]
    return "\n".join(lines)


def _cost_table(points: Mapping[str, Any]) -> list[str]:
    """The cost–robustness table, by rising cost."""
    lines = [
        f"Cost and robustness ({COST_PNG}), over the seeds `none` ran: seconds per training step over `none`'s at "
        "the same seed, the method step's passes (A2T's attack and its pass over the flipped examples come on top, "
        "in the seconds), accuracy under the synonym attack; on the frontier when no other method is as cheap and "
        "as robust, with one of the two strictly better.",
        "",
        "| method | passes / step | cost (× none) | synonym acc | word worst case | frontier |",
        "|---|---|---|---|---|---|",
    ]
    for method, point in points.items():
        cells = [
            f"{point['passes']['mean']:g}" if "passes" in point else "—",
            cell(point["cost"], 2),
            cell(point["synonym"]),
            cell(point.get("worst_case")),
        ]
        lines.append(f"| `{method}` | {' | '.join(cells)} | {'yes' if point['frontier'] else ''} |")
    return [*lines, ""]


def _png(fig: Any) -> bytes:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    from matplotlib import pyplot as plt

    return plt


def plot_cost(points: Mapping[str, Any], title: str) -> bytes:
    """PNG bytes: accuracy under the synonym attack (filled) and the word-level worst case (hollow) against the
    relative cost of a training step, mean ± std over seeds, the frontier joined."""
    fig, axis = _pyplot().subplots(figsize=(6.5, 4.5))
    for method, point in points.items():
        cost, synonym = point["cost"], point["synonym"]
        bars = axis.errorbar(cost["mean"], synonym["mean"], synonym["std"], cost["std"], "o", capsize=3, label=method)
        if "worst_case" in point:
            axis.plot(cost["mean"], point["worst_case"]["mean"], "o", mfc="none", color=bars[0].get_color())
    best = [point for point in points.values() if point["frontier"]]
    axis.plot([p["cost"]["mean"] for p in best], [p["synonym"]["mean"] for p in best], "k--", lw=0.8, label="frontier")
    axis.set(xlabel="seconds per training step (× none)", ylabel="accuracy under the synonym attack", ylim=(0, 1))
    axis.set_title(f"{title}: cost and robustness (hollow: word-level worst case)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(fig)


def plot(summary: Mapping[str, Mapping[str, Mapping[str, float]]], info: Mapping[str, Any]) -> bytes:
    """PNG bytes: accuracy against PGD radius (left) and HotFlip budget (right, if it ran), one line per method."""
    plt = _pyplot()
    budgets = list(range(1, info["attack"]["hotflip_budget"] + 1))
    panels = [("pgd", info["attack"]["radii"], "embedding PGD radius (L2 per example)", "Embedding-space PGD")]
    if budgets:
        panels.append(("hotflip", budgets, "changed words (HotFlip budget)", "Word substitution (HotFlip)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (name, points, label, title) in zip(axes[0], panels, strict=True):
        keys = {0.0: "attack_clean", **{float(x): f"{name}@{x}" for x in points}}
        for method, stats in summary.items():
            found = [(x, stats[key]) for x, key in keys.items() if key in stats]
            if found:
                means, stds = [s["mean"] for _, s in found], [s["std"] for _, s in found]
                axis.errorbar([x for x, _ in found], means, yerr=stds, marker="o", capsize=3, label=method)
        axis.set(xlabel=label, title=title, ylim=(0, 1))
        axis.grid(alpha=0.3)
    if budgets:
        axes[0][1].set_xticks([0, *budgets])
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{info['title']}: mean ± std over seeds, {info['attack']['examples']} test examples", fontsize=10)
    return _png(fig)


def write(directory: str | Path, runs: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> list[Path]:
    """Write the report files into ``directory`` (the plot only when PGD radii were attacked); return their paths."""
    directory = Path(directory)
    summary = summarize(runs)
    document = {"info": dict(info), "summary": summary, "differences": differences(runs), "runs": list(runs)}
    paths = [directory / RESULTS_JSON, directory / RESULTS_MD]
    atomic.write_text(paths[0], json.dumps(document, indent=2) + "\n")
    atomic.write_text(paths[1], markdown(summary, info, runs))
    if info["attack"]["radii"]:
        paths.append(directory / PLOT_PNG)
        atomic.write_with(paths[-1], lambda tmp: tmp.write_bytes(plot(summary, info)))
    points = cost_points(runs)
    if "none" in points and len(points) > 1:
        paths.append(directory / COST_PNG)
        atomic.write_with(paths[-1], lambda tmp: tmp.write_bytes(plot_cost(points, info["title"])))
    return paths


FINAL_LOSS_WINDOW = 10  # optimizer steps the final loss is averaged over


def training_summary(losses: Sequence[float], steps: int, seconds: float, **extra: Any) -> dict[str, Any]:
    """A run's training entry: steps, time, first loss and the mean of the last ``FINAL_LOSS_WINDOW`` losses."""
    tail = list(losses[-FINAL_LOSS_WINDOW:])
    return {
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": seconds / steps if steps else math.nan,
        "steps_per_second": steps / seconds if seconds > 0 else math.nan,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        **extra,
    }


def splits(train: int, whole_train: int, test_labels: Sequence[Any], whole_test: int) -> dict[str, Any]:
    """The report's sizes sentence and the majority-class accuracy of the test labels (always answering the most
    frequent one)."""
    test = len(test_labels)
    sizes = f"Train {train} of {whole_train} training examples, test {test} of {whole_test}."
    return {"sizes": sizes, "majority_accuracy": max(map(list(test_labels).count, set(test_labels))) / test}
