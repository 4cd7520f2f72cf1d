"""The evaluation attacks on a trained tiny model: monotone in the radius, inside the ball, pure."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advfunc.app.classify.evaluate import correct, hotflip_flips, robust_accuracy
from advfunc.app.classify.train import TrainConfig, train
from advfunc.app.common.data import Labels, TextDataset, encode
from advfunc.attacks.robustness import pgd_logits
from advfunc.core.model import PerturbedModel
from advfunc.core.params import params_of
from advfunc.hf.loading import load_classifier
from advfunc.words.hotflip import WordVocabulary, hotflip
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_task import VOCAB, save_tiny_model, sentences

RADII = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def accuracy_of(model, data):
    return float(correct(model, data).float().mean())


def _dataset(rows: list[tuple[str, str]]) -> TextDataset:
    return TextDataset(tuple(t for t, _ in rows), tuple(y for _, y in rows))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model in eval mode, tokenizer, test data): the tiny model trained to well above chance."""
    directory = save_tiny_model(tmp_path_factory.mktemp("attack") / "model")
    train_set, test_set = _dataset(sentences(96, seed=0)), _dataset(sentences(48, seed=1))
    labels = Labels.from_data(train_set)
    loaded = load_classifier(directory, labels.names)
    data = encode(train_set, loaded.tokenizer, labels, 32)
    train(loaded.model, loaded.tokenizer, data, TrainConfig(epochs=8, batch_size=8, lr=3e-3), progress=False)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer, encode(test_set, loaded.tokenizer, labels, 32)


def test_embedding_attack_lowers_accuracy_monotonically(trained):
    model, _, test = trained
    clean = accuracy_of(model, test)
    assert clean >= 0.85, "the fixture model should have learned the task"
    subset_clean, robust = robust_accuracy(model, test, RADII, steps=5)
    assert subset_clean == clean
    curve = [clean, *(robust[r] for r in RADII)]
    assert all(a >= b for a, b in itertools.pairwise(curve)), curve
    assert robust[RADII[-1]] < clean - 0.3, "the largest radius should break most predictions"

    # Each radius attacked on its own (no envelope over smaller radii) is monotone too.
    params = params_of(model)
    batch = test.batch(list(range(len(test))))
    with torch.no_grad():
        correct = model(**batch).logits.argmax(-1) == batch["labels"]
    own = []
    for radius in RADII:
        _, logits = pgd_logits(model, params, batch, radius, 5, "embeds")
        own.append(float((correct & (logits.argmax(-1) == batch["labels"])).float().mean()))
    assert all(a >= b for a, b in itertools.pairwise(own)), own


@settings(max_examples=25, deadline=None)
@given(
    radius=st.floats(min_value=1e-3, max_value=10.0),
    steps=st.integers(min_value=1, max_value=4),
    step_scale=st.sampled_from([None, 0.1, 10.0]),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_embedding_attack_never_leaves_its_ball(trained, radius, steps, step_scale, seed):
    model, _, _ = trained
    g = torch.Generator().manual_seed(seed)
    batch_size, length = 4, 10
    ids = torch.randint(5, len(VOCAB), (batch_size, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch_size,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    batch = {
        "input_ids": torch.where(mask.bool(), ids, torch.zeros_like(ids)),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    step_size = None if step_scale is None else step_scale * radius
    offset, logits = pgd_logits(model, params_of(model), batch, radius, steps, "embeds", step_size)
    norms = offset.flatten(1).norm(dim=1)
    assert bool((norms <= radius * (1 + 1e-5)).all()), (norms, radius)
    assert bool((offset[~mask.bool()] == 0).all()), "padding was perturbed"
    assert logits.shape == (batch_size, 2)


def test_attacks_are_pure(trained):
    model, tokenizer, test = trained
    perturbed, params = PerturbedModel(model), params_of(model)
    batch = test.batch(list(range(8)))
    vocabulary = WordVocabulary.of(tokenizer, len(VOCAB))
    assert_step_is_pure(model, lambda: pgd_logits(model, params, batch, 0.5, 3, "embeds"), params, batch)
    assert_step_is_pure(model, lambda: hotflip(perturbed, params, batch, vocabulary, 2, 5), params, batch)


def test_hotflip_changes_at_most_budget_whole_words(trained):
    model, tokenizer, test = trained
    vocabulary = WordVocabulary.of(tokenizer, len(VOCAB))
    words = {t for t in VOCAB if t.isalpha() and t not in ("[PAD]",)}
    assert {tokenizer.convert_ids_to_tokens(i) for i in vocabulary.is_word.nonzero().squeeze(1).tolist()} == words
    budget = 2
    batch = test.batch(list(range(len(test))))
    flips, adversarial = hotflip(PerturbedModel(model), params_of(model), batch, vocabulary, budget, neighbours=5)
    changed = adversarial != batch["input_ids"]
    assert bool((changed.sum(1) <= budget).all())
    assert bool(vocabulary.is_word[batch["input_ids"][changed]].all()), "a non-word token was replaced"
    assert bool(vocabulary.is_word[adversarial[changed]].all()), "a substitute is not a whole word"
    assert bool((changed.sum(1) <= flips.clamp(max=budget)).all())
    assert bool(((flips > 0) | ~changed.any(1)).all())
    with torch.no_grad():
        predicted = model(**{**batch, "input_ids": adversarial}).logits.argmax(-1)
    broken = flips <= budget
    assert bool((predicted[broken] != batch["labels"][broken]).all()), "a counted break does not fool the model"
    assert int(broken.sum()) > int((flips == 0).sum()), "HotFlip should break some correct predictions"

    flipped = hotflip_flips(model, tokenizer, test, budget=3, neighbours=5)  # words changed before each broke
    values = [float((flipped > b).float().mean()) for b in range(4)]
    assert values[0] == accuracy_of(model, test)
    assert all(a >= b for a, b in itertools.pairwise(values)), values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_runs_where_the_model_is_and_agrees_with_the_cpu(trained):
    """On a GPU the batches are built on the model's device; the counts match the CPU's."""
    model, tokenizer, test = trained
    on_gpu = copy.deepcopy(model).cuda()
    assert accuracy_of(on_gpu, test) == accuracy_of(model, test)
    (clean_gpu, robust_gpu), (clean_cpu, robust_cpu) = (
        robust_accuracy(m, test, (0.1, 1.0), steps=5) for m in (on_gpu, model)
    )
    assert clean_gpu == clean_cpu
    assert all(abs(robust_gpu[r] - robust_cpu[r]) <= 1 / len(test) for r in robust_cpu), (robust_gpu, robust_cpu)
    flipped_gpu, flipped_cpu = (hotflip_flips(m, tokenizer, test, 2, 8) for m in (on_gpu, model))
    assert int((flipped_gpu != flipped_cpu).sum()) <= 1, (flipped_gpu, flipped_cpu)
