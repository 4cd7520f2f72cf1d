"""The decoder comparison's report: ``results.json`` and ``report.md`` (mean ± std over seeds, paired differences).

Both files are written atomically after every finished run, so a long comparison shows
its progress and a killed one keeps what it finished.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advfunc.app import atomic, report
from advfunc.app.report import cell

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"


def metrics(run: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one run that the tables aggregate, flat."""
    evaluation, training = run["eval"], run["train"]
    flat = {
        "answer": evaluation["answer_accuracy"],
        "attack_clean": evaluation["attack_clean_accuracy"],
        "seconds_per_step": training["seconds_per_step"],
        "train_minutes": training["seconds"] / 60,
        "eval_minutes": evaluation["seconds"] / 60,
    }
    flat.update({f"pgd@{r}": a for r, a in evaluation["pgd"].items()})
    synonym = evaluation.get("synonym")
    if synonym is not None:
        flat["synonym"] = synonym["accuracy_under_attack"]
        flat["synonym_clean"] = synonym["clean_accuracy"]
        flat["synonym_success"] = synonym["success_rate"]
    return flat


def markdown(info: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown report: command, settings, one row per method, paired differences, examples."""
    summary = report.summarize(runs, metrics)
    radii = [str(r) for r in info["radii"]]
    accuracy_keys = ["answer", *[f"pgd@{r}" for r in radii], "synonym"]
    accuracy_titles = ["answer acc", *[f"PGD r={r}" for r in radii], "synonym acc"]
    head = ["method", "seeds", *accuracy_titles, "synonym success", "s / step", "train min", "eval min"]
    lines = [
        f"# advfunc decoder: {info['title']}",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Model: {info['model']}. Data: {info['data']}. {info['sizes']}",
        f"Task: {info['task']}",
        f"Training: {info['training']}",
        f"Attacks: {info['attacks']}",
        f"Finished runs: {len(runs)} of {info['planned_runs']}, {info['run_minutes']:.1f} min of run time "
        f"(training and evaluation, summed). Machine: {info['machine']}.",
        "",
        "Cells are mean ± sample std over seeds. Robust accuracy counts an example as correct only when it is",
        "answered correctly clean and no attack up to that radius changed its answer.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * len(head)) + "|",
    ]
    for method, stats in summary.items():
        row = [f"`{method}`", str(int(stats["answer"]["n"]))]
        row += [cell(stats.get(key)) for key in (*accuracy_keys, "synonym_success")]
        row += [cell(stats.get(key), 2) for key in ("seconds_per_step", "train_minutes", "eval_minutes")]
        lines.append("| " + " | ".join(row) + " |")
    # A model that gives one answer to everything looks robust: no attack can change its answer.
    stuck = [f"`{r['method']}` seed {r['seed']}" for r in runs if metrics(r)["answer"] <= info["majority_accuracy"]]
    lines += [
        "",
        f"Always giving the test split's most frequent answer scores {info['majority_accuracy']:.3f}"
        f" (answer acc); on the {info['attack_examples']} attacked examples {info['attack_majority']:.3f}. "
        + (
            f"At or below it (their robust accuracy means nothing): {', '.join(stuck)}."
            if stuck
            else "Every run is above it."
        ),
        "",
    ]
    delta = report.differences(runs, metrics=metrics)
    if delta:
        lines += [
            "Difference to plain fine-tuning (`none`), paired by seed: mean ± sample std of (method − none).",
            "",
            "| method | seeds | " + " | ".join(accuracy_titles) + " |",
            "|" + "|".join(["---"] * (len(accuracy_titles) + 2)) + "|",
        ]
        for method, stats in delta.items():
            cells = [cell(stats.get(key), signed=True) for key in accuracy_keys]
            lines.append(f"| `{method}` | {int(stats['answer']['n'])} | " + " | ".join(cells) + " |")
        lines.append("")
    examples = [(r, e) for r in runs for e in (r["eval"].get("synonym") or {}).get("examples", [])][:5]
    if examples:
        lines += ["Successful synonym substitutions (original → changed; class → answer):", ""]
        for run, example in examples:
            lines.append(
                f'- `{run["method"]}` seed {run["seed"]}: "{example["original"]}" → "{example["adversarial"]}" '
                f"({', '.join(example['changes'])}; {example['label']} → {example['prediction']})"
            )
        lines.append("")
    return "\n".join(lines)


def write(directory: str | Path, runs: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> list[Path]:
    """Write ``results.json`` and ``report.md`` into ``directory``; return their paths."""
    directory = Path(directory)
    summary, delta = report.summarize(runs, metrics), report.differences(runs, metrics=metrics)
    document = {"info": dict(info), "summary": summary, "differences": delta, "runs": list(runs)}
    paths = [directory / RESULTS_JSON, directory / REPORT_MD]
    atomic.write_text(paths[0], json.dumps(document, indent=2) + "\n")
    atomic.write_text(paths[1], markdown(info, runs))
    return paths
