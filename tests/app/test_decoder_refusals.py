"""The decoder job refuses a model folder it cannot fine-tune, in one line, before reading any data."""

from __future__ import annotations

import shutil

import pytest

from advfunc.app.cli import main
from tests.support.tiny_decoders import tiny_decoder
from tests.support.tiny_task import save_tiny_model, sentences, write_csv


@pytest.fixture
def data(tmp_path):
    return write_csv(tmp_path / "train.csv", sentences(8))


def _decoder(folder, data, out) -> list[str]:
    return ["--no-progress", "decoder", "--model", str(folder), "--data", str(data), "--output", str(out),
            "--no-synonym", "--methods", "none", "--seeds", "0"]  # fmt: skip


def test_a_sequence_classifier_is_refused_naming_its_architecture(tmp_path, data, capsys):
    folder = save_tiny_model(tmp_path / "bert")
    capsys.readouterr()  # the save's progress bar
    assert main(_decoder(folder, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "BertForSequenceClassification" in err and "not a causal LM" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_folder_with_config_and_tokenizer_but_no_weights_is_one_line(tmp_path, data, capsys):
    folder = tmp_path / "llama"
    tiny_decoder("llama").save_pretrained(folder)
    save_tiny_model(tmp_path / "bert")  # its tokenizer files, beside the Llama's config
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (tmp_path / "bert" / name).exists():
            shutil.copy(tmp_path / "bert" / name, folder / name)
    (folder / "model.safetensors").unlink()
    capsys.readouterr()  # the save's progress bar
    assert main(_decoder(folder, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no weights" in err and str(folder) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_causal_lm_folder_passes_the_check(tmp_path):
    from advfunc.app.decoder.job import model_folder

    folder = tmp_path / "llama"
    tiny_decoder("llama").save_pretrained(folder)
    assert model_folder(folder) == folder
