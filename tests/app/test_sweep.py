"""``compare --sweep``: candidates picked on the validation split, never on test, and the winner compared."""

from __future__ import annotations

import json

import pytest

from advfunc.app.classify.commands import FREELB_PLUS_PLUS
from advfunc.app.cli import main
from advfunc.methods import registry
from tests.support.tiny_task import save_tiny_model, sentences, write_csv

QUIET = ["--threads", "1", "--no-progress"]
CANDIDATES = ["fgm:epsilon=0.05", "pgd:alpha=0.2,epsilon=0.3,steps=2", "freelb:steps=2,max_norm=0.2,per_token=true"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    save_tiny_model(root / "model")
    write_csv(root / "all.csv", sentences(120, seed=2))
    write_csv(root / "test.csv", sentences(16, seed=3))
    return root


def _compare(task, folder, *extra):
    args = [*QUIET, "compare", "--model", str(task / "model"), "--data", str(task / "all.csv"), "--methods", "none"]
    args += ["--seeds", "0", "1", "--batch-size", "16", "--lr", "3e-3", "--radii", "0.1", "0.5"]
    args += ["--attack-examples", "8", "--hotflip-budget", "0", "--output", str(folder), *extra]
    return main(args)


@pytest.mark.slow
def test_the_sweep_picks_its_most_robust_candidate_on_validation_and_resumes_run_by_run(task, tmp_path, capsys):
    folder = tmp_path / "report"
    assert _compare(task, folder, "--sweep", *CANDIDATES, "--stop-after", "1") == 0
    assert len(list((folder / "sweep" / "runs").iterdir())) == 1 and not (folder / "results.json").exists()
    assert _compare(task, folder, "--sweep", *CANDIDATES, "--stop-after", "2") == 0  # the sweep's last two
    assert len(list((folder / "sweep" / "runs").iterdir())) == 3 and not (folder / "results.json").exists()
    assert _compare(task, folder, "--sweep", *CANDIDATES) == 0

    swept = json.loads((folder / "sweep" / "results.json").read_text())
    assert "validation split" in swept["info"]["data"] and {run["seed"] for run in swept["runs"]} == {0}
    # the pick, recomputed from the sweep's own run files: PGD at the largest radius, then clean accuracy
    scores = {run["method"]: (run["eval"]["robust"]["0.5"], run["eval"]["clean_accuracy"]) for run in swept["runs"]}
    winner = max(scores, key=scores.__getitem__)
    compared = json.loads((folder / "results.json").read_text())
    assert set(compared["summary"]) == {"none", winner}
    assert f"Sweep: {winner}, the most robust on validation of 3 candidates" in (folder / "results.md").read_text()
    assert "validation" not in compared["info"]["data"]  # the comparison itself is attacked on test


@pytest.mark.slow
def test_the_sweep_takes_the_candidate_its_robustness_ranks_first_not_the_first_listed(task, tmp_path, monkeypatch):
    from advfunc.app.classify import commands

    preferred = CANDIDATES[-1]
    rank = {commands.Arm.parse(text).label: i for i, text in enumerate(CANDIDATES)}
    monkeypatch.setattr(commands, "robustness", lambda run: (float(rank[run["method"]]), 0.0))  # the last ranks first
    folder = tmp_path / "report"
    assert _compare(task, folder, "--seeds", "0", "--sweep", *CANDIDATES) == 0
    compared = json.loads((folder / "results.json").read_text())
    assert list(compared["summary"]) == ["none", commands.Arm.parse(preferred).label]


def test_robustness_reads_the_synonym_attack_then_the_worst_case_then_pgd_at_the_largest_radius():
    from advfunc.app.classify.commands import robustness

    pgd = {"clean_accuracy": 0.8, "robust": {"0.1": 0.6, "0.4": 0.2}, "synonym": None, "worst_case": None}
    assert robustness({"eval": pgd}) == (0.2, 0.8)
    assert robustness({"eval": {**pgd, "worst_case": 0.3}}) == (0.3, 0.8)
    synonym = {"accuracy_under_attack": 0.5}
    assert robustness({"eval": {**pgd, "worst_case": 0.3, "synonym": synonym}}) == (0.5, 0.8)


def test_a_sweep_with_a_test_file_is_refused_before_any_training(task, tmp_path, capsys):
    folder = tmp_path / "report"
    assert _compare(task, folder, "--eval-data", str(task / "test.csv"), "--sweep", *CANDIDATES) == 2
    assert "--eval-data is a test file; the validation split" in capsys.readouterr().err
    assert not folder.exists()


def test_the_freelb_plus_plus_search_is_six_valid_distinct_freelb_settings():
    specs = [registry.parse_method(text) for text in FREELB_PLUS_PLUS]
    assert {spec.name for spec in specs} == {"freelb"} and len({spec.identity for spec in specs}) == 6
    per_token = [spec for spec in specs if spec.options.get("per_token")]
    assert len(per_token) == 3
    # every candidate can reach its ball's boundary: lr · steps = 2 · radius
    assert all(
        spec.options["lr"] * spec.options["steps"] == pytest.approx(2 * spec.options["max_norm"]) for spec in specs
    )


def test_the_full_preset_parses_into_distinct_arms_with_the_synonym_defences_and_a2t():
    from advfunc.app.classify.commands import PRESETS, Arm

    arms = [Arm.parse(text) for text in PRESETS["full"]["methods"]]  # a bad spec raises here
    assert len({arm.identity for arm in arms}) == len(arms)
    assert {"none", "fgm", "freelb", "ascc", "dne"} <= {arm.name for arm in arms}
    assert [arm.name for arm in arms if arm.a2t] == ["none"]  # A2T as published: plain fine-tuning plus its examples
