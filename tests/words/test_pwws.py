"""PWWS and the TextFooler search against independent oracles: a hand-computed order and exhaustive search."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
import torch

from advfunc.words.synonym_attack import SynonymAttackConfig, attack_text, attack_texts, word_spans


class Thesaurus:
    """A stand-in for WordNet whose synonyms the test sets: ``synonyms(word, senses) -> list``."""

    def __init__(self, synonyms: dict[str, list[str]]) -> None:
        self.table = synonyms

    def synonyms(self, word: str, senses: str = "usual") -> list[str]:
        return list(self.table.get(word.lower(), []))


class Linear:
    """Two classes, the logit of class 1 the sum of the words' weights (unknown words, "[UNK]" too, weigh 0)."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights
        self.texts: list[str] = []  # every text classified, in order

    def __call__(self, texts) -> torch.Tensor:
        self.texts.extend(texts)
        scores = torch.tensor([sum(self.weights.get(w, 0.0) for w in re.findall(r"[a-z]+", t.lower())) for t in texts])
        return torch.stack([torch.sigmoid(-scores), torch.sigmoid(scores)], dim=1).double()


def letters(texts) -> torch.Tensor:
    return torch.stack(
        [torch.bincount(torch.tensor([ord(c) % 32 for c in t] or [0]), minlength=32) for t in texts]
    ).float()


WEIGHTS = {"alpha": 3.0, "beta": 1.0, "gamma": 0.5, "delta": -0.5, "ant": 1.7, "ape": 2.5, "bee": -0.4}
WEIGHTS |= {"gnu": 0.9, "dog": -1.2, "doe": -0.8}
SYNONYMS = {"alpha": ["ape", "ant"], "beta": ["bee"], "gamma": ["gnu"], "delta": ["doe", "dog"]}


def _hand_computed_pwws_order() -> list[tuple[str, str]]:
    """Ren et al.'s Algorithm 1 on "alpha beta gamma delta", class 1, written out with math only."""

    def p(score: float) -> float:
        return 1 / (1 + math.exp(-score))

    total = sum(WEIGHTS[w] for w in SYNONYMS)
    saliency = {w: p(total) - p(total - WEIGHTS[w]) for w in SYNONYMS}  # the word replaced by an unknown one
    norm = sum(math.exp(s) for s in saliency.values())
    scored = []
    for word, candidates in SYNONYMS.items():
        drops = {c: p(total) - p(total - WEIGHTS[word] + WEIGHTS[c]) for c in candidates}
        best = max(drops, key=lambda c: drops[c])
        scored.append((math.exp(saliency[word]) / norm * drops[best], word, best))
    return [(word, best) for _, word, best in sorted(scored, reverse=True)]


@pytest.mark.parametrize("step", ["fixed", "rescore"])
def test_the_pwws_order_is_the_hand_computed_one(step):
    order = _hand_computed_pwws_order()
    # The example separates the paper's score from its two factors: neither alone gives this order.
    assert [w for w, _ in order] == ["alpha", "beta", "delta", "gamma"]
    for changes in range(1, 5):
        config = SynonymAttackConfig(similarity=-1.0, max_change=changes / 4, pwws_step=step)
        model = Linear(WEIGHTS)
        result = attack_text("alpha beta gamma delta", 1, model, letters, Thesaurus(SYNONYMS), config)  # type: ignore[arg-type]
        assert result.status == "failed"  # the score stays positive under every change
        expected = set(order[:changes])
        if step == "rescore":  # a step is kept only if it lowers P(1): gamma's best raises it
            expected -= {("gamma", "gnu")}
        assert {(s.original, s.synonym) for s in result.substitutions} == expected
        # queries: the text, one [UNK] text per word, one per candidate, then per step after the first
        # the paper's one text, or all the word's candidates on top of the earlier changes (1, 2, 1)
        steps = changes - 1 if step == "fixed" else [0, 1, 3, 4][changes - 1]
        assert result.queries == 1 + 4 + 6 + steps == len(model.texts)
        assert "[UNK] beta gamma delta" in model.texts


SEARCHES = [{"search": "pwws"}, {"search": "pwws", "pwws_step": "fixed"}, {"search": "textfooler"}]


class TinyNetwork:
    """A random non-linear two-class model: logits = W2 tanh(W1 Σ embeddings), a synonym's embedding near its word's."""

    def __init__(self, synonyms: dict[str, list[str]], seed: int, spread: float = 0.7) -> None:
        generator = torch.Generator().manual_seed(seed)

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        self.embeddings = {"": draw(6)}  # "": any word not listed, "[UNK]" among them
        for word, others in synonyms.items():
            self.embeddings[word] = draw(6)
            self.embeddings.update({other: self.embeddings[word] + spread * draw(6) for other in others})
        self.hidden, self.out = draw(6, 6), draw(6, 2)

    def __call__(self, texts) -> torch.Tensor:
        rows = []
        for text in texts:
            words = re.findall(r"[A-Za-z\[\]]+", text.lower())
            rows.append(torch.stack([self.embeddings.get(w, self.embeddings[""]) for w in words]).sum(0))
        return torch.softmax(torch.tanh(torch.stack(rows) @ self.hidden) @ self.out, dim=-1)


TINY_SYNONYMS = {
    "plot": ["story", "scheme"],
    "actors": ["players", "cast"],
    "shine": ["glow", "beam"],
    "bright": ["vivid", "smart", "clear"],
    "score": ["music", "mark"],
}
TINY_TEXTS = [
    "bright actors shine",
    "plot score actors",
    "bright plot shine score",
    "score shine bright",
    "actors plot bright",
    "shine plot score actors",
]


def _exhaustive(model, text: str, label: int, allowed: int) -> tuple[float, set[str], bool]:
    """Every text within ``allowed`` substitutions: the least P(label), the texts, whether one flips."""
    words = text.split()
    options = [[w, *TINY_SYNONYMS.get(w, [])] for w in words]
    texts = {
        " ".join(c)
        for c in itertools.product(*options)
        if sum(a != b for a, b in zip(c, words, strict=True)) <= allowed
    }
    texts = sorted(texts)
    probabilities = model(texts)
    return float(probabilities[:, label].min()), set(texts), bool((probabilities.argmax(-1) != label).any())


def _single_flip_exists(model, text: str, label: int) -> bool:
    words = text.split()
    singles = [
        " ".join([*words[:i], s, *words[i + 1 :]]) for i, w in enumerate(words) for s in TINY_SYNONYMS.get(w, [])
    ]
    return bool((model(singles).argmax(-1) != label).any())


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("max_change", [0.34, 0.5, 1.0])
def test_the_exhaustive_minimum_bounds_the_attack_and_every_single_flip_is_found(search, max_change):
    config = SynonymAttackConfig(similarity=-1.0, max_change=max_change, **search)
    checked = {"single flips": 0, "failures": 0}
    for seed in range(12):
        model = TinyNetwork(TINY_SYNONYMS, seed)
        for text in TINY_TEXTS:
            label = int(model([text])[0].argmax())
            result = attack_text(text, label, model, letters, Thesaurus(TINY_SYNONYMS), config)  # type: ignore[arg-type]
            allowed = max(1, int(max_change * len(text.split())))
            least, reachable, flip_exists = _exhaustive(model, text, label, allowed)
            assert result.adversarial in reachable
            assert least <= float(model([result.adversarial])[0, label]) + 1e-12
            assert (result.status == "succeeded") <= flip_exists
            if result.status == "succeeded":
                assert int(model([result.adversarial])[0].argmax()) == result.prediction != label
            else:
                checked["failures"] += 1
            if _single_flip_exists(model, text, label):
                checked["single flips"] += 1
                if search["search"] == "pwws":  # PWWS scores every single substitution, so it never misses one
                    assert result.status == "succeeded", (seed, text)
                    assert len(result.substitutions) == 1
    assert checked["single flips"] > 5 and checked["failures"] > 5  # both branches were exercised


@pytest.mark.parametrize("search", SEARCHES)
def test_batched_and_one_at_a_time_runs_give_identical_results(search):
    model = TinyNetwork(TINY_SYNONYMS, seed=3)
    texts = TINY_TEXTS * 3
    labels = [int(model([t])[0].argmax()) for t in texts]
    labels[4] = 1 - labels[4]  # one misclassified text among them
    thesaurus = Thesaurus(TINY_SYNONYMS)
    config = SynonymAttackConfig(similarity=0.9, max_change=0.5, texts_per_batch=len(texts), **search)
    calls = []

    def counted(texts):
        calls.append(len(texts))
        return model(texts)

    batched = attack_texts(texts, labels, counted, letters, thesaurus, config)  # type: ignore[arg-type]
    batched_calls = len(calls)
    alone = [attack_text(t, y, counted, letters, thesaurus, config) for t, y in zip(texts, labels, strict=True)]  # type: ignore[arg-type]
    reported = []
    two_at_a_time = dataclasses.replace(config, texts_per_batch=2)
    paired = attack_texts(texts, labels, model, letters, thesaurus, two_at_a_time, finished=reported.append)  # type: ignore[arg-type]

    def outcome(results):
        return [dataclasses.replace(r, seconds=0.0) for r in results]

    assert outcome(batched) == outcome(alone) == outcome(paired)
    assert reported == paired  # each result reported once, in order, as its batch ended
    assert {r.status for r in batched} == {"skipped", "succeeded", "failed"}
    assert batched_calls < len(calls) - batched_calls  # the batched run asked the model far fewer times


def test_the_summary_names_the_search_and_its_cost():
    from advfunc.words.synonym_attack import AttackSummary

    model = Linear(WEIGHTS)
    for config, name in [
        (SynonymAttackConfig(similarity=-1.0), "pwws (rescore steps)"),
        (SynonymAttackConfig(similarity=-1.0, pwws_step="fixed"), "pwws (fixed steps)"),
        (SynonymAttackConfig(similarity=-1.0, search="textfooler"), "textfooler (delete order)"),
    ]:
        results = attack_texts(["alpha beta gamma delta"], [1], model, letters, Thesaurus(SYNONYMS), config)  # type: ignore[arg-type]
        summary = AttackSummary.of(results)
        assert summary.search == name and summary.seconds > 0 and summary.queries == results[0].queries


def test_word_spans_are_what_the_oracles_split_on():
    assert [t for t in TINY_TEXTS if len(word_spans(t)) != len(t.split())] == []


@pytest.mark.parametrize("search", ["pwws", "textfooler"])
def test_a_text_the_budget_cannot_rank_is_untried_never_robust(search):
    from advfunc.words.synonym_attack import AttackSummary

    config = SynonymAttackConfig(similarity=-1.0, search=search, query_budget=4)  # 1 + 4 rankings > 4 queries
    model = Linear(WEIGHTS)
    long_text = attack_text("alpha beta gamma delta", 1, model, letters, Thesaurus(SYNONYMS), config)  # type: ignore[arg-type]
    assert long_text.status == "untried" and not long_text.substitutions and long_text.queries == 1
    short = attack_text("alpha", 1, model, letters, Thesaurus(SYNONYMS), config)  # type: ignore[arg-type]
    assert short.status == "failed"  # "ape" and "ant" both keep class 1: searched, and it held
    summary = AttackSummary.of([long_text, short])
    assert summary.clean_accuracy == 1.0 and summary.untried == 0.5
    assert summary.accuracy_under_attack == 0.5  # only the text the attack could search counts as robust
    assert summary.success_rate == 0.0
