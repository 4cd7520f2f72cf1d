"""The ``advfunc`` command end to end on a tiny random model: train, evaluate, compare, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from transformers import AutoModelForSequenceClassification

import advfunc
from advfunc.app.classify.train import padded
from advfunc.app.cli import main
from advfunc.app.common import checkpoint
from advfunc.hf.loading import load_classifier
from tests.support.tiny_models import PAD_ID, padded_batch, tiny_model
from tests.support.tiny_task import save_tiny_model, sentences, write_csv, write_jsonl

QUIET = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    save_tiny_model(root / "model")
    write_csv(root / "train.csv", sentences(48, seed=0))
    write_csv(root / "test.csv", sentences(32, seed=1))
    write_csv(root / "all.csv", sentences(80, seed=2))
    return root


def _train(task: Path, output: Path, *extra: str) -> int:
    args = [*QUIET, "train", "--model", str(task / "model"), "--data", str(task / "train.csv")]
    args += ["--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--output", str(output), *extra]
    return main(args)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(str(directory / "model.safetensors"))


@pytest.mark.slow  # trains and runs whole commands
def test_train_checkpoint_evaluate_compare(task, tmp_path, capsys):
    out = tmp_path / "fgm"
    assert _train(task, out, "--method", "fgm:epsilon=0.05", "--max-grad-norm", "0.5") == 0
    state = json.loads((out / checkpoint.STATE_FILE).read_text())
    assert state["finished"] and state["step"] == state["total_steps"] == 12
    assert state["config"]["method"] == "fgm:epsilon=0.05"
    model = AutoModelForSequenceClassification.from_pretrained(out)  # a plain HF checkpoint
    assert model.config.id2label == {0: "neg", 1: "pos"}

    report_json = tmp_path / "eval.json"
    args = [*QUIET, "evaluate", "--model", str(out), "--data", str(task / "test.csv"), "--radii", "0.1", "0.5"]
    args += ["--attack-examples", "8", "--hotflip-budget", "1", "--output", str(report_json)]
    args += ["--encoder", str(task / "model"), "--synonym-queries", "40", "--similarity", "0.5"]
    assert main(args) == 0
    result = json.loads(report_json.read_text())
    assert result["examples"] == 32 and result["attack_examples"] == 8
    assert set(result["robust"]) == {"0.1", "0.5"} and set(result["hotflip"]) == {"1"}
    synonym = result["synonym"]
    fields = {"clean_accuracy", "accuracy_under_attack", "success_rate", "changed_share", "queries", "examples"}
    fields |= {"search", "seconds", "untried"}
    assert set(synonym) == fields
    assert synonym["clean_accuracy"] == result["attack_clean_accuracy"]
    assert 0 <= synonym["accuracy_under_attack"] <= synonym["clean_accuracy"] and 0 < synonym["queries"] <= 40
    assert json.loads(capsys.readouterr().out)["clean_accuracy"] == result["clean_accuracy"]

    folder = tmp_path / "report"
    args = [*QUIET, "compare", "--model", str(task / "model"), "--data", str(task / "all.csv")]
    args += ["--methods", "none", "fgm:epsilon=0.05", "--seeds", "0", "1", "--batch-size", "16", "--lr", "3e-3"]
    args += ["--radii", "0.1", "0.5", "--attack-examples", "8", "--hotflip-budget", "1", "--output", str(folder)]
    args += ["--encoder", str(task / "model"), "--synonym-queries", "40", "--synonym"]
    assert main(args) == 0
    document = json.loads((folder / "results.json").read_text())
    assert len(document["runs"]) == 4 and document["info"]["finished_runs"] == 4
    assert set(document["summary"]) == {"none", "fgm(epsilon=0.05)"}
    table = (folder / "results.md").read_text()
    assert "| `none` | 2 |" in table and "±" in table and "PGD r=0.5" in table and "steps / s" in table
    assert "synonym acc" in table and "synonym success" in table
    assert all(run["eval"]["synonym"]["queries"] <= 40 for run in document["runs"])
    assert (folder / "accuracy_vs_radius.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in folder.rglob(".*")], "temporary files left behind"

    capsys.readouterr()
    assert main(args) == 0  # a rerun finds every run done and only rewrites the report
    assert capsys.readouterr().err.count("already done") == 4


def test_resume_continues_from_the_saved_step(task, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train(task, whole) == 0
    assert _train(task, part, "--stop-after", "5") == 0
    state = json.loads((part / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 5 and not state["finished"]

    capsys.readouterr()
    assert _train(task, part, "--resume") == 0
    assert "from step 5 of 12" in capsys.readouterr().err
    state = json.loads((part / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 12 and state["finished"] and len(state["losses"]) == 12
    expected, resumed = _weights(whole), _weights(part)
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)

    assert _train(task, part, "--resume") == 0  # finished: nothing to do, still success
    fresh = tmp_path / "again"
    assert _train(task, fresh, "--stop-after", "3") == 0
    assert _train(task, fresh, "--resume", "--lr", "1e-3") == 2
    assert "settings differ" in capsys.readouterr().err


def test_a_failed_save_leaves_the_previous_checkpoint_and_nothing_else(task, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    assert _train(task, target, "--stop-after", "3") == 0
    before, files = _weights(target), sorted(p.name for p in target.iterdir())
    state = json.loads((target / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 3 and state["files"] == files

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)  # the optimizer's and the random state's files
    with pytest.raises(OSError, match="disk full"):
        _train(task, target, "--resume")  # trains to step 6, then fails to write its checkpoint
    assert json.loads((target / checkpoint.STATE_FILE).read_text()) == state  # the old one
    assert sorted(p.name for p in target.iterdir()) == files
    for name, value in _weights(target).items():
        assert torch.equal(value, before[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "a partial directory was left"
    with pytest.raises(OSError, match="disk full"):
        _train(task, tmp_path / "new", "--stop-after", "1")
    assert not (tmp_path / "new").exists()


def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    write_csv(root / "empty.csv", [])
    write_csv(root / "odd_label.csv", [("the movie was good", "pos"), ("it was fine", "meh")])
    write_csv(root / "body.csv", sentences(8), columns=("body", "label"))
    write_jsonl(root / "rows.jsonl", sentences(8))
    (root / "not_a_model").mkdir(exist_ok=True)
    (root / "not_a_model" / "notes.txt").write_text("hello")
    return {
        "missing file": (["--data", str(root / "nope.csv")], "does not exist"),
        "missing column": (["--data", str(root / "body.csv")], "has no column 'text'"),
        "missing jsonl column": (["--data", str(root / "rows.jsonl"), "--label-column", "y"], "has no column 'y'"),
        "empty data set": (["--data", str(root / "empty.csv")], "is empty"),
        "model dir that is not a model": (["--model", str(root / "not_a_model")], "not a Hugging Face model directory"),
        "missing model dir": (["--model", str(root / "gone")], "does not exist"),
        "unknown method": (["--method", "fancy"], "unknown method 'fancy'"),
        "unknown hyper-parameter": (["--method", "pgd:radius=1"], "no hyper-parameter 'radius'"),
        "bad hyper-parameter value": (["--method", "pgd:epsilon=-1"], "epsilon"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "missing column",
        "missing jsonl column",
        "empty data set",
        "model dir that is not a model",
        "missing model dir",
        "unknown method",
        "unknown hyper-parameter",
        "bad hyper-parameter value",
    ],
)
def test_bad_training_input_is_a_clear_error(task, tmp_path, capsys, case):
    flags, message = _bad_inputs(tmp_path)[case]
    args = [*QUIET, "train", "--model", str(task / "model"), "--data", str(task / "train.csv")]
    args += ["--output", str(tmp_path / "out"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("advfunc: error: ") and message in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "a failed run left an output behind"


def test_unknown_label_at_evaluation_is_a_clear_error(task, tmp_path, capsys):
    _bad_inputs(tmp_path)
    out = tmp_path / "model"
    assert _train(task, out, "--epochs", "1") == 0
    args = [*QUIET, "evaluate", "--model", str(out), "--data", str(tmp_path / "odd_label.csv")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown label 'meh'" in err and "['neg', 'pos']" in err
    # A base model without a classification head is refused instead of evaluated at random.
    base = tmp_path / "base"
    loaded = load_classifier(out)
    loaded.model.bert.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    assert main([*QUIET, "evaluate", "--model", str(base), "--data", str(task / "test.csv")]) == 2
    assert "no trained classification head" in capsys.readouterr().err


def test_output_is_never_overwritten_by_accident(task, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(task, out, "--epochs", "1") == 0
    assert _train(task, out, "--epochs", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _train(task, out, "--epochs", "1", "--overwrite") == 0


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_world_size_without_a_launcher_is_refused_before_any_work(task, tmp_path, capsys, monkeypatch, command):
    """WORLD_SIZE without the launcher's RANK, LOCAL_RANK and MASTER_ADDR: no process group could form."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    args = [*QUIET, command, "--model", str(task / "model"), "--data", str(task / "train.csv"), "--output", str(out)]
    assert main(args) == 2
    assert "WORLD_SIZE is 2" in capsys.readouterr().err
    assert not out.exists()


def test_the_decoder_command_is_registered(capsys):
    assert main(["decoder", "--help"]) == 0
    assert "decoder" in capsys.readouterr().out
    assert main(["decoder", "--radii", "-1"]) == 2
    assert "--radii" in capsys.readouterr().err


@pytest.mark.slow  # trains and runs whole commands
def test_python_dash_m_exits_non_zero(tmp_path):
    command = [sys.executable, "-m", "advfunc", "--threads", "1", "train", "--data", str(tmp_path / "x.csv")]
    done = subprocess.run([*command, "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "x.csv does not exist" in done.stderr


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_batches_padded_to_a_multiple_of_16_give_the_same_loss_and_gradients(family):
    """Where steps compile (CUDA) the command pads batches to widths in multiples of 16: masked columns only."""
    model = tiny_model(family, num_labels=2)
    batch = padded_batch(family, batch=4, length=10, seed=1, num_labels=2)
    wide = padded(batch, PAD_ID[family], 16)
    assert wide["input_ids"].shape == (4, 16) and torch.equal(wide["input_ids"][:, :10], batch["input_ids"])
    assert not wide["attention_mask"][:, 10:].any() and bool((wide["input_ids"][:, 10:] == PAD_ID[family]).all())
    assert torch.equal(wide["labels"], batch["labels"])
    assert padded(batch, PAD_ID[family], 16, limit=12)["input_ids"].shape == (4, 12)  # never past --max-length
    assert padded(wide, PAD_ID[family], 16) is wide
    step = advfunc.fgm(model, epsilon=0.1, target="embeds")
    grads, out = step(advfunc.params_of(model), batch)
    wide_grads, wide_out = step(advfunc.params_of(model), wide)
    torch.testing.assert_close(wide_out.loss, out.loss)
    for name, grad in grads.items():
        torch.testing.assert_close(wide_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["ascc:steps=1", "dne:steps=1"])
def test_a_synonym_method_trains_from_the_command_line_on_wordnet_synonyms(task, tmp_path, method):
    """The Trainer builds the synonym table from the tokenizer, so a spec alone names ASCC or DNE."""
    assert _train(task, tmp_path / "run", "--method", method, "--epochs", "1") == 0
    assert json.loads((tmp_path / "run" / checkpoint.STATE_FILE).read_text())["finished"]


def test_the_trainer_builds_wordnet_synonyms_of_the_vocabulary_once(task):
    from transformers import AutoTokenizer, TrainingArguments

    from advfunc.hf import AdversarialTrainer

    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    model = AutoModelForSequenceClassification.from_pretrained(task / "model")
    args = TrainingArguments(output_dir=str(task / "unused"), use_cpu=True, report_to=[])
    trainer = AdversarialTrainer(model=model, args=args, processing_class=tokenizer, step_factory="dne:steps=1")
    table = trainer._synonyms
    vocab = tokenizer.get_vocab()

    def synonyms(word: str) -> set[str]:
        return set(tokenizer.convert_ids_to_tokens(table.ids[vocab[word]][table.mask[vocab[word]]].tolist()))

    # WordNet 3.0's synonyms that the tiny vocabulary holds; the unknown token is never one
    assert synonyms("dull") == {"boring"} and synonyms("boring") == {"dull"}
    assert synonyms("movie") == {"film"} and synonyms("film") == {"movie"}
    assert synonyms("the") == set()
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        AdversarialTrainer(model=model, args=args, step_factory="ascc:steps=1")
