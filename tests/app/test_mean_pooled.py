"""The mean-pooled classification head, its loading and training through the CLI, and the paired report."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

import advfunc
from advfunc.app.cli import main
from advfunc.app.common import checkpoint, report
from advfunc.app.common.data import Labels
from advfunc.hf import mean_pooled
from advfunc.hf.loading import load_classifier
from tests.support.tiny_task import save_tiny_model, sentences, write_csv

LABELS = {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("encoder") / "model")


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 9, 20, 3, 0, 0], [2, 7, 8, 13, 14, 25, 3]])  # [B, L], 0 pads
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 1])}


def test_logits_read_the_masked_mean_of_the_encoders_token_states(encoder_dir):
    model = mean_pooled.from_encoder(encoder_dir, **LABELS).eval()
    batch = _batch()
    source = AutoModel.from_pretrained(encoder_dir, add_pooling_layer=False).eval()
    hidden = source(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = model.classifier((hidden * mask).sum(1) / mask.sum(1))
    out = model(**batch)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, batch["labels"]))


def test_padding_never_changes_a_prediction(encoder_dir):
    model = mean_pooled.from_encoder(encoder_dir, **LABELS).eval()
    batch = _batch()
    padded = {
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, 5)),
        "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, 5)),
    }
    torch.testing.assert_close(
        model(**padded).logits, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    )


def test_a_saved_model_loads_back_as_itself(encoder_dir, tmp_path):
    model = mean_pooled.from_encoder(encoder_dir, **LABELS).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(again, mean_pooled.MeanPooledForSequenceClassification)
    assert torch.equal(again(**_batch()).logits, model(**_batch()).logits)


def test_the_head_is_new_and_the_encoder_is_the_pretrained_one(encoder_dir):
    labels = Labels(("neg", "pos"))
    loaded = load_classifier(encoder_dir, labels.names, pooling="mean")
    assert isinstance(loaded.model, mean_pooled.MeanPooledForSequenceClassification)
    source = AutoModel.from_pretrained(encoder_dir, add_pooling_layer=False).state_dict()
    assert all(torch.equal(loaded.model.encoder.state_dict()[k], v) for k, v in source.items())
    plain = load_classifier(encoder_dir, labels.names).model  # pooling="cls": the model's own head
    assert not isinstance(plain, mean_pooled.MeanPooledForSequenceClassification) and hasattr(plain.bert, "pooler")


def test_a_new_head_starts_at_zero_so_the_first_step_leaves_the_encoder_alone(encoder_dir):
    model = mean_pooled.from_encoder(encoder_dir, **LABELS)
    assert not model.classifier.weight.any() and not model.classifier.bias.any()
    model(**_batch()).loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert all(not p.grad.any() for name, p in model.named_parameters() if not name.startswith("classifier."))


def test_an_advfunc_step_trains_encoder_and_head(encoder_dir):
    model = mean_pooled.from_encoder(encoder_dir, **LABELS)
    torch.nn.init.normal_(model.classifier.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    grads, out = advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=2, target="embeds")(
        advfunc.params_of(model), _batch()
    )
    assert set(grads) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert (
        grads["classifier.weight"].abs().sum() > 0
        and grads["encoder.embeddings.word_embeddings.weight"].abs().sum() > 0
    )
    assert out.adv_loss >= out.loss - 1e-6


def test_train_and_evaluate_with_a_mean_pooled_head(encoder_dir, tmp_path):
    write_csv(tmp_path / "train.csv", sentences(48, seed=0))
    write_csv(tmp_path / "test.csv", sentences(32, seed=1))
    quiet = ["--threads", "1", "--no-progress"]
    args = [*quiet, "train", "--model", str(encoder_dir), "--data", str(tmp_path / "train.csv"), "--pooling", "mean"]
    assert (
        main(
            [
                *args,
                "--epochs",
                "3",
                "--batch-size",
                "8",
                "--lr",
                "3e-3",
                "--head-lr",
                "3e-2",
                "--output",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    state = json.loads((tmp_path / "run" / checkpoint.STATE_FILE).read_text())
    assert state["config"]["pooling"] == "mean"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == mean_pooled.MODEL_TYPE
    args = [*quiet, "evaluate", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "test.csv")]
    args += ["--radii", "0.1", "--attack-examples", "4", "--hotflip-budget", "1", "--no-synonym"]
    assert main([*args, "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["clean_accuracy"] > 0.5


def _run(method: str, seed: int, clean: float, robust: float) -> dict:
    evaluation = {"clean_accuracy": clean, "attack_clean_accuracy": clean, "robust": {"0.1": robust}, "hotflip": {}}
    evaluation["seconds"] = 30.0
    training = {"seconds_per_step": 1.0, "steps_per_second": 1.0, "seconds": 60.0}
    return {"method": method, "seed": seed, "eval": evaluation, "train": training}


def test_the_report_pairs_each_method_with_plain_training_by_seed():
    runs = [_run("none", 0, 0.70, 0.40), _run("none", 1, 0.80, 0.50)]
    runs += [_run("fgm", 0, 0.72, 0.45), _run("fgm", 1, 0.78, 0.60), _run("pgd", 1, 0.81, 0.55)]
    delta = report.differences(runs)
    assert set(delta) == {"fgm", "pgd"}
    assert delta["fgm"]["clean"]["mean"] == pytest.approx(0.0) and delta["fgm"]["clean"]["n"] == 2
    assert delta["fgm"]["clean"]["std"] == pytest.approx(torch.tensor([0.02, -0.02]).std().item())
    assert delta["fgm"]["pgd@0.1"]["mean"] == pytest.approx(0.075)
    assert delta["pgd"]["clean"] == {"mean": pytest.approx(0.01), "std": 0.0, "n": 1}


def _report(*cleans: float) -> str:
    runs = [_run("none", seed, clean, 0.3) for seed, clean in enumerate(cleans)]
    info = {
        "title": "t",
        "command": "advfunc compare",
        "model": "m",
        "data": "d",
        "sizes": "s",
        "training": "t",
        "attack": {"radii": [0.1], "hotflip_budget": 0, "examples": 4},
        "attack_text": "a",
        "machine": "cpu",
        "majority_accuracy": 0.6,
        "finished_runs": len(runs),
        "planned_runs": len(runs),
        "elapsed_minutes": 0.0,
    }
    return report.markdown(report.summarize(runs), info, runs)


def _majority_line(*cleans: float) -> str:
    return next(line for line in _report(*cleans).splitlines() if line.startswith("Always answering"))


def test_the_report_sums_the_run_time_of_its_runs_whichever_invocation_ran_them():
    """A report rebuilt from finished run files (0.0 min of its own) still says what the runs cost."""
    line = next(line for line in _report(0.75, 0.71).splitlines() if line.startswith("Finished runs"))
    assert line.startswith("Finished runs: 2 of 2, 3.0 min of run time")  # 2 × (60 s training + 30 s attacks)
    assert "this invocation 0.0 min wall time" in line


def test_the_report_names_runs_that_did_not_clear_the_majority_class_by_ten_points():
    assert _majority_line(0.75, 0.71).endswith("Every run is at least 10 points above it (the lowest: 0.710).")
    line = _majority_line(0.75, 0.69, 0.602)
    assert "did not learn" in line and "`none` seed 2" in line.split("did not learn")[1].split(".")[0]
    assert line.endswith("Less than 10 points above it: `none` seed 1.")
