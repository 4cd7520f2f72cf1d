"""What the two jobs share: one data selection, one run grid, flags generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from advfunc.app.classify.evaluate import AttackConfig
from advfunc.app.classify.train import TrainConfig
from advfunc.app.cli import build_parser, main
from advfunc.app.common.flags import build
from advfunc.app.common.grid import RunGrid, read_run, run_file_name
from advfunc.app.common.report import splits as report_splits
from advfunc.app.common.word_attacks import synonym_config
from advfunc.methods import registry
from advfunc.words.synonym_attack import SynonymAttackConfig
from tests.support.tiny_task import save_tiny_model, sentences, write_csv

QUIET = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    save_tiny_model(root / "model")
    write_csv(root / "all.csv", sentences(60, seed=0))
    write_csv(root / "test.csv", sentences(16, seed=1))
    return root


@pytest.mark.parametrize("command", ["compare", "decoder"])
def test_eval_data_without_data_is_refused_by_both_jobs(task, tmp_path, capsys, command):
    args = [*QUIET, command, "--model", str(task / "model"), "--eval-data", str(task / "test.csv")]
    assert main([*args, "--output", str(tmp_path / "out"), "--methods", "none", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["advfunc: error: --eval-data needs --data (the training file)"], err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("command", ["evaluate", "compare", "decoder"])
def test_every_synonym_attack_field_is_a_flag_and_round_trips(command):
    """A field added to SynonymAttackConfig becomes a flag of every command that runs the attack."""
    changed = {
        "max_candidates": "7",
        "max_change": "0.5",
        "query_budget": "9",
        "similarity": "0.25",
        "order": "gradient",
    }
    names = {"max_candidates": "--synonym-candidates", "max_change": "--synonym-change"}
    names |= {"query_budget": "--synonym-queries", "similarity": "--similarity", "order": "--word-order"}
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = subcommands.choices[command]._option_string_actions
    words = [command] + (["--model", "m"] if command == "evaluate" else [])
    for field in dataclasses.fields(SynonymAttackConfig):
        flag = names.get(field.name, "--synonym-" + field.name.replace("_", "-"))
        assert flag in options and options[flag].dest == "synonym_" + field.name, (flag, sorted(options))
        if field.name in changed:
            words += [flag, changed[field.name]]
    args = build_parser().parse_args(words)
    config = synonym_config(args)
    assert config is not None
    for name, text in changed.items():
        assert str(getattr(config, name)) == text
    assert synonym_config(build_parser().parse_args([*words, "--no-synonym"])) is None


def test_the_decoder_refuses_the_gradient_word_order_before_any_work(tmp_path, capsys):
    assert main(["decoder", "--word-order", "gradient", "--output", str(tmp_path / "out")]) == 2
    assert "--word-order gradient" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_training_and_attack_flags_build_their_configs(task):
    args = build_parser().parse_args(
        ["train", "--output", "o", "--epochs", "3", "--head-lr", "0.01", "--pooling", "mean"]
    )
    config = build(TrainConfig, args, method="fgm", seed=4)
    assert config == TrainConfig(method="fgm", seed=4, epochs=3, head_lr=0.01, pooling="mean")
    args = build_parser().parse_args(["evaluate", "--model", "m", "--radii", "0.3", "0.1", "--attack-examples", "5"])
    attack = build(AttackConfig, args, synonym=None)
    assert attack == AttackConfig(radii=(0.3, 0.1), examples=5, synonym=None)


def test_the_grid_runs_each_pair_once_stops_after_n_and_resumes(tmp_path):
    methods = [registry.parse_method(text) for text in ("none", "fgm:epsilon=0.5")]
    calls, reports = [], []

    def one(spec, seed):
        calls.append((spec.label, seed))
        return {"train": {"seconds": 1.0}, "eval": {"seconds": 1.0}}

    grid = RunGrid(tmp_path, methods, [0, 1], lambda spec, seed: {"method": spec.label, "seed": seed, "t": (1,)}, 3)
    runs = grid.run(one, lambda runs: reports.append(len(runs)))
    assert len(runs) == 3 and reports == [1, 2, 3] and len(calls) == 3
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        run_file_name(label, seed) for label, seed in calls
    )
    assert json.loads((tmp_path / "runs" / run_file_name("none", 0)).read_text())["key"]["t"] == [1]
    calls.clear()
    grid.stop_after = None
    assert len(grid.run(one, lambda runs: None)) == 4 and calls == [("fgm(epsilon=0.5)", 1)]
    with pytest.raises(ValueError, match="--seeds lists one run twice"):
        RunGrid(tmp_path, methods, [1, 1], lambda spec, seed: {})
    with pytest.raises(ValueError, match="--methods lists one run twice"):
        RunGrid(tmp_path, [methods[0], registry.parse_method("none")], [0], lambda spec, seed: {})


def test_the_grid_describes_both_jobs_alike_and_rewrites_the_report_after_each_run(tmp_path):
    methods = [registry.parse_method(text) for text in ("none", "fgm:epsilon=0.5")]
    grid = RunGrid(tmp_path, methods, [0, 3], lambda spec, seed: {"seed": seed}, stop_after=3)
    attack = {"radii": [], "hotflip_budget": 0, "examples": 2}
    info = grid.describe("decoder", "t", ["decoder", "--stop-after", "3", "--seeds", "0", "3"], attack=attack)
    info.update(model="m", data="d", sizes="s", training="x", attack_text="a", majority_accuracy=None)
    assert info["command"] == "advfunc decoder --seeds 0 3" and info["planned_runs"] == 4
    assert info["methods"] == ["none", "fgm(epsilon=0.5)"] and info["seeds"] == [0, 3] and info["job"] == "decoder"
    finished = []

    def one(spec, seed):
        if (tmp_path / "results.json").exists():  # the report of the runs before this one
            finished.append(json.loads((tmp_path / "results.json").read_text())["info"]["finished_runs"])
        return {"train": {"seconds": 1.0}, "eval": {"seconds": 1.0}}

    assert len(grid.run_reported(one, info)) == 3 and finished == [1, 2]
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["info"]["finished_runs"] == 3 and len(document["runs"]) == 3
    quiet = tmp_path / "quiet"
    RunGrid(quiet, methods, [0], lambda spec, seed: {}).run_reported(lambda spec, seed: None, {}, reporting=False)
    assert not (quiet / "results.json").exists()
    assert report_splits(2, 5, ["a", "b", "b"], 9) == {
        "sizes": "Train 2 of 5 training examples, test 3 of 9.",
        "majority_accuracy": 2 / 3,
    }


def test_run_files_of_the_earlier_reports_are_read_in_the_shared_form(tmp_path):
    old_decoder = {"method": "none", "seed": 0, "eval": {"answer_accuracy": 0.7, "pgd": {"0.1": 0.5}, "seconds": 3.0}}
    old_decoder["train"] = {"seconds_per_step": 1.5, "seconds": 6.0}
    old_classifier = {"method": "none", "seed": 1, "eval": {"clean_accuracy": 0.8, "robust": {"0.1": 0.6}}}
    old_classifier["train"] = {"time_per_step": 2.0, "seconds": 8.0}
    for name, run in (("a.json", old_decoder), ("b.json", old_classifier)):
        (tmp_path / name).write_text(json.dumps(run))
    decoder, classifier = read_run(tmp_path / "a.json"), read_run(tmp_path / "b.json")
    assert decoder["eval"]["clean_accuracy"] == 0.7 and decoder["eval"]["robust"] == {"0.1": 0.5}
    assert classifier["train"]["seconds_per_step"] == 2.0 and classifier["eval"]["robust"] == {"0.1": 0.6}
    assert "answer_accuracy" not in decoder["eval"] and "time_per_step" not in classifier["train"]


@pytest.mark.slow
def test_compare_stops_after_n_runs_and_reports_the_worst_case(task, tmp_path, capsys):
    out = tmp_path / "report"
    args = [*QUIET, "compare", "--model", str(task / "model"), "--data", str(task / "all.csv"), "--output", str(out)]
    args += ["--methods", "none", "--seeds", "0", "1", "--batch-size", "16", "--lr", "3e-3", "--radii", "0.1"]
    args += ["--attack-examples", "6", "--hotflip-budget", "1", "--encoder", str(task / "model"), "--synonym"]
    args += ["--synonym-queries", "30"]
    assert main([*args, "--stop-after", "1"]) == 0
    assert len(list((out / "runs").glob("*.json"))) == 1
    assert main(args) == 0
    assert "already done" in capsys.readouterr().err
    document = json.loads((out / "results.json").read_text())
    for run in document["runs"]:
        evaluation = run["eval"]
        hotflip, synonym = evaluation["hotflip"]["1"], evaluation["synonym"]["accuracy_under_attack"]
        # both attacks ran on the same examples: the worst case lies between the union bound and either attack
        assert max(0.0, hotflip + synonym - evaluation["attack_clean_accuracy"]) - 1e-9 <= evaluation["worst_case"]
        assert evaluation["worst_case"] <= min(hotflip, synonym) + 1e-9
    assert "word worst case" in (out / "results.md").read_text()
