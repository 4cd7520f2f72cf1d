"""``compare --quick`` trains long enough to leave the majority class (a proxy for the real demo).

The demo fine-tunes a pre-trained sentence encoder whose mean token state already carries
sentiment almost linearly; what the preset decides is whether its steps and its fresh head's
learning rate are enough to find it. The tiny stand-in gets the same situation: its sentiment
words share one embedding direction (+v for positive, -v for negative), its head is fresh.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from advfunc.app.cli import main
from tests.support.tiny_task import NEGATIVE, POSITIVE, VOCAB, save_tiny_model, sentences, write_csv


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    save_tiny_model(root / "model", seed=0)
    model = BertForSequenceClassification.from_pretrained(root / "model")
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()
    with torch.no_grad():
        table = model.bert.embeddings.word_embeddings.weight  # [V, H]
        table[[VOCAB.index(w) for w in POSITIVE]] += direction
        table[[VOCAB.index(w) for w in NEGATIVE]] -= direction
    model.save_pretrained(root / "model")
    rng = random.Random(0)
    # 60/40: a third of the negatives dropped, so always answering "pos" is a real baseline
    rows = [row for row in sentences(1200, seed=0) if row[1] == "pos" or rng.random() < 2 / 3]
    write_csv(root / "all.csv", rows)
    return root


def _clean_over_majority(task: Path, output: Path, *extra: str) -> float:
    args = ["--threads", "1", "--no-progress", "compare", "--quick", "--model", str(task / "model")]
    args += ["--data", str(task / "all.csv"), "--methods", "none", "--seeds", "0", "--no-synonym"]
    args += ["--radii", "0.1", "--attack-examples", "4", "--hotflip-budget", "1", "--output", str(output), *extra]
    assert main(args) == 0
    document = json.loads((output / "results.json").read_text())
    return document["runs"][0]["eval"]["clean_accuracy"] - document["info"]["majority_accuracy"]


@pytest.mark.slow  # trains and runs whole commands
def test_the_quick_preset_leaves_the_majority_class(task, tmp_path):
    assert _clean_over_majority(task, tmp_path / "quick") >= 0.10
    # the same preset cut to two steps stays at the majority class: the margin above is the preset's doing
    assert _clean_over_majority(task, tmp_path / "two-steps", "--train-size", "32") < 0.10
