"""Synonym substitution, the word-level attack of TextFooler and PWWS, with TextDefender's constraints.

For each correctly classified text the attack ranks its words by importance, then walks
them in that order, replacing each by the WordNet synonym that most lowers the
probability of the true label, until the prediction flips or a budget runs out:

* candidates: up to ``max_candidates`` single-word WordNet synonyms of the word, from
  the senses of its usual part of speech (:class:`advfunc.app.wordnet.WordNet`);
* stop words are never changed; at most ``max_change`` of a text's words are changed;
* every query (one text classified) counts against ``query_budget``;
* a changed text must keep cosine similarity ≥ ``similarity`` to the original under a
  sentence encoder (all-MiniLM-L6-v2, mean-pooled, in the command-line evaluation).

Word importance is either the drop of the true label's probability when the word is
deleted (``order="delete"``, one query per word, as in TextFooler) or the norm of the
loss gradient at the word's embedding outputs (``order="gradient"``, one forward and
backward, counted as one query).

Papers: Jin et al., "Is BERT Really Robust?" (TextFooler), AAAI 2020; Ren et al.,
"Generating Natural Language Adversarial Examples through Probability Weighted Word
Saliency" (PWWS), ACL 2019; Li et al., "Searching for an Effective Defender"
(TextDefender), EMNLP 2021.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from advfunc.app.word_attacks.wordnet import WordNet

# Classifies texts: [N] strings -> [N, C] probabilities. Each text is one query.
Classify = Callable[[Sequence[str]], torch.Tensor]
# Embeds texts: [N] strings -> [N, D] sentence embeddings (cosine is taken here).
Encode = Callable[[Sequence[str]], torch.Tensor]
# Word importance by gradient: (text, word spans, label) -> [W] scores.
GradientImportance = Callable[[str, Sequence[tuple[int, int]], int], torch.Tensor]
Order = Literal["delete", "gradient"]

_WORD = re.compile(r"[A-Za-z]+")
# English function words, never substituted (the role of TextFooler's and TextDefender's stop lists).
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
    not now of off on once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your yours yourself
    yourselves also although always among another anyone anything became become becomes cannot else ever
    every everyone everything however indeed least less many may might much must neither never nevertheless
    none nothing often perhaps quite rather really several since still therefore though thus together toward
    towards upon us whatever whenever wherever whether whoever whole whose within without yet""".split()  # noqa: SIM905
)


@dataclass(frozen=True)
class SynonymAttackConfig:
    """The attack's constraints; TextDefender's values where it sets them."""

    max_candidates: int = 50  # synonyms tried per word
    max_change: float = 0.25  # at most this share of a text's words is changed (TextDefender: 0.1–0.3)
    query_budget: int = 500  # classified texts per example, importance ranking included
    similarity: float = 0.8  # cosine of mean-pooled sentence embeddings, original vs changed
    order: Order = "delete"

    def check(self) -> None:
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if not 0 < self.max_change <= 1:
            raise ValueError(f"max_change must be a share in (0, 1], got {self.max_change}")
        if self.query_budget < 1:
            raise ValueError(f"query_budget must be >= 1, got {self.query_budget}")
        if not -1 <= self.similarity <= 1:
            raise ValueError(f"similarity must be a cosine in [-1, 1], got {self.similarity}")
        if self.order not in ("delete", "gradient"):
            raise ValueError(f"order must be 'delete' or 'gradient', got {self.order!r}")


@dataclass(frozen=True)
class Substitution:
    """One changed word: its position among the text's words, the original and the synonym."""

    index: int
    original: str
    synonym: str


@dataclass(frozen=True)
class AttackResult:
    """The outcome for one text.

    status: ``"skipped"`` (misclassified before any change), ``"succeeded"`` (the label
    flipped) or ``"failed"``. ``queries`` counts classified texts.
    """

    text: str
    label: int
    status: str
    adversarial: str
    prediction: int
    queries: int
    words: int
    substitutions: tuple[Substitution, ...] = ()

    @property
    def changed_share(self) -> float:
        return len(self.substitutions) / max(1, self.words)


@dataclass
class AttackSummary:
    """TextAttack's summary of a run over many texts."""

    clean_accuracy: float
    accuracy_under_attack: float
    success_rate: float  # succeeded / (succeeded + failed)
    changed_share: float  # mean share of words changed, over successful attacks
    queries: float  # mean queries per attacked (not skipped) text
    examples: list[dict[str, object]] = field(default_factory=list)

    @classmethod
    def of(cls, results: Sequence[AttackResult], keep: int = 5) -> AttackSummary:
        if not results:
            raise ValueError("no results to summarise: attack at least one text")
        succeeded = [r for r in results if r.status == "succeeded"]
        attacked = [r for r in results if r.status != "skipped"]
        examples = [
            {
                "original": r.text,
                "adversarial": r.adversarial,
                "label": r.label,
                "prediction": r.prediction,
                "changes": [f"{s.original} -> {s.synonym}" for s in r.substitutions],
            }
            for r in succeeded[:keep]
        ]
        return cls(
            clean_accuracy=len(attacked) / len(results),
            accuracy_under_attack=(len(attacked) - len(succeeded)) / len(results),
            success_rate=len(succeeded) / len(attacked) if attacked else 0.0,
            changed_share=sum(r.changed_share for r in succeeded) / len(succeeded) if succeeded else 0.0,
            queries=sum(r.queries for r in attacked) / len(attacked) if attacked else 0.0,
            examples=examples,
        )


def word_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the alphabetic words of ``text``."""
    return [match.span() for match in _WORD.finditer(text)]


def _replace(text: str, spans: Sequence[tuple[int, int]], words: dict[int, str | None]) -> str:
    """``text`` with word i replaced by ``words[i]`` (deleted when None), the rest untouched."""
    pieces, cursor = [], 0
    for i in sorted(words):
        start, end = spans[i]
        pieces.append(text[cursor:start])
        pieces.append(words[i] or "")
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def _cased_like(synonym: str, original: str) -> str:
    if original.isupper() and len(original) > 1:
        return synonym.upper()
    return synonym.capitalize() if original[:1].isupper() else synonym


class _Queries:
    """The classifier behind a per-example budget: it refuses work that would exceed it."""

    def __init__(self, classify: Classify, budget: int) -> None:
        self.classify = classify
        self.budget = budget
        self.used = 0

    def left(self) -> int:
        return self.budget - self.used

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        assert len(texts) <= self.left()
        self.used += len(texts)
        return self.classify(texts)


def attack_text(
    text: str,
    label: int,
    classify: Classify,
    encode: Encode,
    wordnet: WordNet,
    config: SynonymAttackConfig,
    gradient_importance: GradientImportance | None = None,
) -> AttackResult:
    """Attack one text; see the module docstring for the algorithm and its constraints."""
    spans = word_spans(text)
    queries = _Queries(classify, config.query_budget)
    probs = queries([text])[0]
    prediction = int(probs.argmax())
    if prediction != label:
        return AttackResult(text, label, "skipped", text, prediction, queries.used, len(spans))
    words = [text[s:e] for s, e in spans]
    candidates = {
        i: [_cased_like(s, w) for s in wordnet.synonyms(w)[: config.max_candidates]]
        for i, w in enumerate(words)
        if w.lower() not in STOP_WORDS
    }
    candidates = {i: c for i, c in candidates.items() if c}
    order = _importance_order(text, spans, label, sorted(candidates), queries, config, gradient_importance)
    if order is None:  # the ranking alone would exceed the budget
        return AttackResult(text, label, "failed", text, prediction, queries.used, len(spans))
    allowed = max(1, int(config.max_change * len(spans)))
    chosen: dict[int, str | None] = {}
    current_p = float(probs[label])
    reference = encode([text])  # [1, D]
    for i in order:
        if len(chosen) >= allowed or queries.left() <= 0:
            break
        trials = [_replace(text, spans, {**chosen, i: synonym}) for synonym in candidates[i]]
        similar = torch.nn.functional.cosine_similarity(encode(trials), reference) >= config.similarity  # [K]
        kept = [t for t, ok in zip(trials, similar.tolist(), strict=True) if ok]
        synonyms = [s for s, ok in zip(candidates[i], similar.tolist(), strict=True) if ok]
        kept, synonyms = kept[: queries.left()], synonyms[: queries.left()]
        if not kept:
            continue
        trial_probs = queries(kept)  # [K, C]
        flipped = (trial_probs.argmax(-1) != label).nonzero().squeeze(1)
        if flipped.numel():  # among the changes that flip the label, the most confident one
            best = int(flipped[trial_probs[flipped, label].argmin()])
        else:
            best = int(trial_probs[:, label].argmin())
        if float(trial_probs[best, label]) >= current_p and not flipped.numel():
            continue
        chosen[i] = synonyms[best]
        current_p = float(trial_probs[best, label])
        if flipped.numel():
            substitutions = tuple(Substitution(j, words[j], str(chosen[j])) for j in sorted(chosen))
            return AttackResult(
                text,
                label,
                "succeeded",
                kept[best],
                int(trial_probs[best].argmax()),
                queries.used,
                len(spans),
                substitutions,
            )
    substitutions = tuple(Substitution(j, words[j], str(chosen[j])) for j in sorted(chosen))
    return AttackResult(
        text, label, "failed", _replace(text, spans, chosen), prediction, queries.used, len(spans), substitutions
    )


def _importance_order(
    text: str,
    spans: Sequence[tuple[int, int]],
    label: int,
    positions: list[int],
    queries: _Queries,
    config: SynonymAttackConfig,
    gradient_importance: GradientImportance | None,
) -> list[int] | None:
    """The substitutable word positions, most important first; None when the budget cannot pay for it."""
    if not positions:
        return []
    if config.order == "gradient":
        if gradient_importance is None:
            raise ValueError("order='gradient' needs gradient_importance(text, spans, label)")
        if queries.left() < 1:
            return None
        queries.used += 1  # one forward and backward
        scores = gradient_importance(text, spans, label)[positions]  # [P]
    else:
        if queries.left() < len(positions):
            return None
        deleted = [_replace(text, spans, {i: None}) for i in positions]
        scores = -queries(deleted)[:, label]  # [P]: a lower true-label probability means a more important word
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    return [positions[k] for k in ranked]


def attack_texts(
    texts: Sequence[str],
    labels: Sequence[int],
    classify: Classify,
    encode: Encode,
    wordnet: WordNet,
    config: SynonymAttackConfig,
    gradient_importance: GradientImportance | None = None,
) -> list[AttackResult]:
    """:func:`attack_text` for each (text, label)."""
    config.check()
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    return [
        attack_text(text, int(label), classify, encode, wordnet, config, gradient_importance)
        for text, label in zip(texts, labels, strict=True)
    ]
