"""What a report says: label names, the attacked examples' clean accuracy, no spread from one seed, no HotFlip at 0."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from advfunc.app.classify import evaluate as evaluation
from advfunc.app.cli import main
from advfunc.app.common import report
from tests.support.tiny_task import save_tiny_model, sentences, write_csv

INFO = {
    "job": "compare", "title": "t", "command": "advfunc compare", "model": "m", "data": "d", "sizes": "s",
    "training": "tr", "attack": {"radii": [0.1], "hotflip_budget": 0, "examples": 4}, "attack_text": "a",
    "finished_runs": 2, "planned_runs": 2, "machine": "cpu",
}  # fmt: skip


def _run(method: str, seed: int, clean: float, attack_clean: float, robust: float) -> dict:
    evaluation = {"clean_accuracy": clean, "attack_clean_accuracy": attack_clean, "robust": {"0.1": robust},
                  "hotflip": {}, "synonym": None, "worst_case": None, "seconds": 1.0}  # fmt: skip
    return {"method": method, "seed": seed, "train": {"seconds": 2.0, "seconds_per_step": 0.5}, "eval": evaluation}


def _row(text: str, method: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| `{method}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_one_seed_cells_show_the_mean_alone_and_the_attacked_clean_accuracy_stands_beside_robust():
    runs = [_run("none", 0, 0.70, 0.50, 0.45), _run("fgm", 0, 0.72, 0.75, 0.60), _run("fgm", 1, 0.74, 0.25, 0.20)]
    text = report.markdown(report.summarize(runs), INFO, runs)
    header = _row(text.replace("| method |", "| `header` |"), "header")
    assert header[2:5] == ["clean acc (test)", "clean (attacked)", "PGD r=0.1"]
    assert _row(text, "none")[2:5] == ["0.700", "0.500", "0.450"]  # one seed: no "± 0.000"
    assert _row(text, "fgm")[2:5] == ["0.730 ± 0.014", "0.500 ± 0.354", "0.400 ± 0.283"]
    assert "± 0.000" not in text


def _costed(method: str, seed: int, seconds_per_step: float, synonym: float, passes: int) -> dict:
    run = _run(method, seed, 0.8, 0.8, 0.5)
    run["train"].update(seconds_per_step=seconds_per_step, passes=passes)
    run["eval"].update(synonym={"accuracy_under_attack": synonym, "success_rate": 0.0, "changed_share": 0.0,
                                "queries": 1.0, "untried": 0.0}, worst_case=synonym - 0.1)  # fmt: skip
    return run


def test_cost_is_paired_by_seed_and_the_frontier_holds_exactly_the_undominated_methods(tmp_path):
    # seed 1's machine is twice as slow: costs relative to none at the same seed stay exact.
    runs = [
        *(_costed("none", seed, 0.1 * (1 + seed), 0.30, 1) for seed in (0, 1)),
        *(_costed("fgm", seed, 0.2 * (1 + seed), 0.40, 2) for seed in (0, 1)),  # 2×: more robust, on it
        *(_costed("pgd", seed, 0.4 * (1 + seed), 0.35, 4) for seed in (0, 1)),  # 4×, less robust than fgm: off
        *(_costed("ascc", seed, 0.6 * (1 + seed), 0.50 + 0.1 * seed, 6) for seed in (0, 1)),  # 6×: most robust
    ]
    summary = report.summarize(runs)
    points = report.cost_points(runs)
    assert list(points) == ["none", "fgm", "pgd", "ascc"]  # by rising cost
    assert [points[m]["cost"]["mean"] for m in points] == pytest.approx([1.0, 2.0, 4.0, 6.0])
    assert [points[m]["cost"]["std"] for m in points] == pytest.approx([0.0] * 4, abs=1e-12)
    assert {m for m, p in points.items() if p["frontier"]} == {"none", "fgm", "ascc"}
    text = report.markdown(summary, {**INFO, "finished_runs": 8, "planned_runs": 8}, runs)
    assert _row(text.split("Cost and robustness")[1], "pgd") == ["`pgd`", "4", "4.00 ± 0.00", "0.350 ± 0.000",
                                                                   "0.250 ± 0.000", ""]  # fmt: skip
    assert _row(text.split("Cost and robustness")[1], "ascc")[3:] == ["0.550 ± 0.071", "0.450 ± 0.071", "yes"]
    paths = report.write(tmp_path, runs, {**INFO, "finished_runs": 8, "planned_runs": 8})
    assert (tmp_path / report.COST_PNG) in paths and (tmp_path / report.COST_PNG).read_bytes()[:4] == b"\x89PNG"


def test_no_cost_picture_without_plain_fine_tuning_or_the_synonym_attack(tmp_path):
    without_none = [_costed("fgm", 0, 0.2, 0.4, 2), _costed("pgd", 0, 0.4, 0.35, 4)]
    assert report.cost_points(without_none) == {}
    no_synonym = [_run("none", 0, 0.7, 0.5, 0.4), _run("fgm", 0, 0.7, 0.5, 0.4)]
    assert report.cost_points(no_synonym) == {}
    assert report.COST_PNG not in {p.name for p in report.write(tmp_path, no_synonym, INFO)}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-contents")
    folder = save_tiny_model(root / "model")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(folder)
    return {"model": folder, "test": write_csv(root / "test.csv", sentences(16, seed=1))}


def test_evaluate_names_labels_and_runs_no_hotflip_at_budget_zero(task, tmp_path, capsys, monkeypatch):
    attack = evaluation.synonym_attack

    def any_change_flips(classify, texts, labels, *rest, **options):
        """The real attack on a victim whose answer flips once any word changed: every try succeeds."""
        originals = set(texts)

        def victim(batch):
            probabilities = classify(batch)  # [N, 2]
            changed = torch.tensor([text not in originals for text in batch])
            return torch.where(changed[:, None], probabilities.flip(-1), probabilities)

        victim.seen_ids = classify.seen_ids  # type: ignore[attr-defined]  # it reads what the model reads

        return attack(victim, texts, labels, *rest, **options)

    monkeypatch.setattr(evaluation, "synonym_attack", any_change_flips)
    out = tmp_path / "eval.json"
    args = ["--threads", "1", "evaluate", "--model", str(task["model"]), "--data", str(task["test"])]
    args += ["--radii", "0.1", "--attack-examples", "16", "--hotflip-budget", "0", "--output", str(out)]
    args += ["--encoder", str(task["model"]), "--synonym-queries", "40"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    examples = result["synonym"]["examples"]
    assert examples
    assert all(e["label"] in ("neg", "pos") and e["prediction"] in ("neg", "pos") for e in examples)
    assert all(e["label"] != e["prediction"] for e in examples)
    err = capsys.readouterr().err
    assert "HotFlip" not in err and "hotflip" not in err
    assert result["hotflip"] == {}
