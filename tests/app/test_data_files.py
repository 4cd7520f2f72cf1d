"""Data files as users write them: long fields, numeric labels, encodings, duplicates, splits too small."""

from __future__ import annotations

import csv
import json

import pytest

from advfunc.app.cli import main
from advfunc.app.common.data import DataError, Labels, TextDataset, fixed_split, load_file


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_field_longer_than_csvs_default_limit_is_read_whole(tmp_path, suffix):
    long_text = "word " * 40_000  # 200,000 characters: over csv's default 131,072
    path = tmp_path / f"long{suffix}"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writerows([("text", "label"), (long_text, "pos"), ("short", "neg")])
    data = load_file(path)
    assert data.texts == (long_text.strip(), "short") and data.labels == ("pos", "neg")


def test_numeric_labels_are_one_class_per_number_in_every_format(tmp_path):
    rows = [("a", "1"), ("b", "1.0"), ("c", "0"), ("d", "0.0"), ("e", "+1"), ("f", " 0 ")]
    (tmp_path / "n.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    values = [1, 1.0, 0, 0.0, 1, 0]
    (tmp_path / "n.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": v}) + "\n" for (t, _), v in zip(rows, values, strict=True))
    )
    for name in ("n.csv", "n.jsonl"):
        data = load_file(tmp_path / name)
        assert data.labels == ("1", "1", "0", "0", "1", "0"), name
        assert Labels.from_data(data).names == ("0", "1")
    (tmp_path / "words.csv").write_text("text,label\na,0.5\nb,nan\nc,x1\n", encoding="utf-8")
    assert load_file(tmp_path / "words.csv").labels == ("0.5", "nan", "x1")  # not whole numbers: kept as written


def test_a_utf16_file_with_its_byte_order_mark_is_read(tmp_path):
    (tmp_path / "u.tsv").write_bytes("text\tlabel\ncafé au lait\tpos\nflat\tneg\n".encode("utf-16"))
    data = load_file(tmp_path / "u.tsv")
    assert data.texts == ("café au lait", "flat") and data.labels == ("pos", "neg")
    (tmp_path / "latin.csv").write_bytes("text,label\nok,pos\ncafé,neg\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv, line 3: not UTF-8"):
        load_file(tmp_path / "latin.csv")


def test_a_json_record_with_a_key_twice_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0, "text": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: the record names key 'text' twice"):
        load_file(tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text('[{"label": 1, "label": 0, "text": "a"}]')
    with pytest.raises(DataError, match=r"d.json: a record names key 'label' twice"):
        load_file(tmp_path / "d.json")


def _decoder_args(tmp_path, data, *extra):
    return ["--no-progress", "decoder", "--model", str(tmp_path / "no-model"), "--data", str(data),
            "--no-synonym", "--output", str(tmp_path / "out"), *extra]  # fmt: skip


def _rows(count, labels=("pos", "neg")):
    return "text,label\n" + "".join(f"snippet number {i},{labels[i % len(labels)]}\n" for i in range(count))


def test_the_decoder_job_refuses_a_single_label_as_train_and_compare_do(tmp_path, capsys, monkeypatch):
    from advfunc.app.decoder import job

    # The data is refused before the model's weights are read; the folder's tokenizer is not needed for that.
    monkeypatch.setattr(job, "model_folder", lambda path: path)
    monkeypatch.setattr(job, "load_tokenizer", lambda folder, chat_template: None)
    (tmp_path / "one.csv").write_text(_rows(40, labels=("pos",)), encoding="utf-8")
    assert main(_decoder_args(tmp_path, tmp_path / "one.csv", "--answer", "pos=yes", "--answer", "neg=no")) == 2
    err = capsys.readouterr().err
    assert "1 distinct label(s) ['pos']" in err and "needs 2 or more" in err


def test_a_split_without_test_rows_names_the_file_and_split(tmp_path, capsys, monkeypatch):
    from advfunc.app.decoder import job

    monkeypatch.setattr(job, "model_folder", lambda path: path)
    monkeypatch.setattr(job, "load_tokenizer", lambda folder, chat_template: None)
    # Two texts both hashed into the training split: the 80/10/10 split leaves no test row.
    texts = tuple(f"snippet number {i}" for i in range(40))
    kept = fixed_split(TextDataset(texts, ("pos",) * len(texts)))["train"].texts[:2]
    (tmp_path / "tiny.csv").write_text(f"text,label\n{kept[0]},pos\n{kept[1]},neg\n", encoding="utf-8")
    assert main(_decoder_args(tmp_path, tmp_path / "tiny.csv", "--answer", "pos=yes", "--answer", "neg=no")) == 2
    err = capsys.readouterr().err
    assert f"data file {tmp_path / 'tiny.csv'}" in err and "test split empty" in err
