"""Synonym substitution, the word-level attacks PWWS and TextFooler, with TextDefender's constraints.

Two searches over the same candidates and constraints (``SynonymAttackConfig.search``):

* ``"pwws"`` (Ren et al., ACL 2019). For a text ``x`` of true class ``y`` with
  substitutable words ``w_i``: the word saliency ``S_i = P(y|x) - P(y|x with w_i replaced
  by the unknown token)``; the best substitute ``w_i*`` of each word, the candidate with
  the largest ``ΔP_i* = P(y|x) - P(y|x with w_i -> w_i*)``; the score ``H_i = softmax(S)_i ·
  ΔP_i*``; then the words are changed in descending ``H``, each on top of the earlier
  changes, until the prediction flips. The step (``pwws_step``): ``"fixed"`` puts in
  ``w_i*`` as the paper's Algorithm 1 does (one query per step); ``"rescore"`` (default)
  tries all the word's candidates on top of the earlier changes and keeps the best one if
  it lowers ``P(y)``, as the reference implementations do (TextAttack's greedy search with
  the weighted-saliency order): the earlier changes alter which substitute is best, and
  this step is the stronger attack (one query per candidate). Cost before the steps: one
  query per word for ``S``, one per candidate for ``w_i*``. One addition to the paper:
  the candidates are scored word by word in descending saliency, and a candidate that
  already flips the prediction ends the attack (the lowest true-class probability among
  the flipping ones), so every single substitution that flips the prediction is found and
  no query is spent after a flip. The softmax over all words or over the substitutable
  ones gives the same order.
* ``"textfooler"`` (Jin et al., AAAI 2020, its greedy search): words ranked by importance,
  either the drop of the true label's probability when the word is deleted
  (``order="delete"``, one query per word) or the norm of the loss gradient at the word's
  embedding outputs (``order="gradient"``, one forward and backward, counted as one
  query); each word in turn is replaced by the candidate that most lowers the true
  label's probability given the changes so far, kept only if it lowers it, until the
  prediction flips. Cheaper than PWWS (no candidate pass over every word) and weaker.

Candidates and constraints, shared by both:

* words are whole words: runs of letters and digits joined by apostrophes or hyphens
  (``it's``, ``isn't``, ``film's``, ``sad-sack``), never cut into fragments;
* candidates: up to ``max_candidates`` single-word WordNet synonyms of the word, from
  every sense of it (``part_of_speech="any"``, as PWWS looks words up) or the senses of
  its usual part of speech (``"usual"``; :class:`advfunc.words.wordnet.WordNet`);
* only the words the classifier reads are attacked and counted: given ``seen_ids`` (each
  text's token ids after the classifier's truncation), a text longer than the classifier
  reads keeps the words before the first cut that already gives the whole input
  (:func:`visible_words`); the change budget and the share of words changed are of those;
* stop words are never changed; at most ``max_change`` of a text's (visible) words are changed;
* every query (one text classified) counts against ``query_budget``; a text classified
  twice is asked once;
* a changed text must keep cosine similarity >= ``similarity`` to the original under a
  sentence encoder (all-MiniLM-L6-v2, mean-pooled, in the command-line evaluation):
  candidates failing it are never queried, and a PWWS greedy step failing it is skipped.

Many texts are attacked together (``texts_per_batch``): each text's search runs as its own
sequence of requests, and the requests of all texts that are waiting are answered by one
call of the classifier (or of the encoder), the texts sorted by length so that batches
pad little. The batching changes no result: each text gets the answers it would get alone
(a classifier whose outputs depend on what it is batched with, beyond float rounding of
padded batches, is outside that promise).

Papers: Ren et al., "Generating Natural Language Adversarial Examples through Probability
Weighted Word Saliency" (PWWS), ACL 2019; Jin et al., "Is BERT Really Robust?"
(TextFooler), AAAI 2020; Li et al., "Searching for an Effective Defender" (TextDefender),
EMNLP 2021.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from advfunc.core.arguments import require_steps
from advfunc.words.wordnet import Senses, WordNet

# Classifies texts: [N] strings -> [N, C] probabilities. Each text is one query.
Classify = Callable[[Sequence[str]], torch.Tensor]
# Embeds texts: [N] strings -> [N, D] sentence embeddings (cosine is taken here).
Encode = Callable[[Sequence[str]], torch.Tensor]
# The token ids the classifier reads of each text, after its truncation: [N] strings -> [N] id lists.
SeenIds = Callable[[Sequence[str]], list[list[int]]]
# Word importance by gradient: (text, word spans, label) -> [W] scores.
GradientImportance = Callable[[str, Sequence[tuple[int, int]], int], torch.Tensor]


class TruncatingClassifier(Protocol):
    """A :data:`Classify` that reads each text only up to its truncation, and says what it reads."""

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...

    def seen_ids(self, texts: Sequence[str]) -> list[list[int]]: ...


Order = Literal["delete", "gradient"]
Search = Literal["pwws", "textfooler"]
PartOfSpeech = Literal["any", "usual"]
PwwsStep = Literal["rescore", "fixed"]

# A whole word: letters and digits of any script (with combining accents), joined by apostrophes or
# hyphens to more of them. ASCII letters alone would cut "naïve" into "na" (WordNet: sodium) and "ve".
_WORD_PART = r"[^\W_](?:[^\W_]|[\u0300-\u036f])*"
_WHOLE_WORD = re.compile(rf"{_WORD_PART}(?:['\u2019-]{_WORD_PART})*")
# Runs of letters only; cuts "it's" into "it" and "s" (the attack's earlier tokenisation).
_LETTER_RUN = re.compile(r"[A-Za-z]+")
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
    """The attack's search and constraints; TextDefender's values where it sets them."""

    max_candidates: int = 50  # synonyms tried per word
    max_change: float = 0.25  # at most this share of a text's words is changed (TextDefender: 0.1–0.3)
    query_budget: int = 500  # classified texts per example, importance ranking included
    similarity: float = 0.8  # cosine of mean-pooled sentence embeddings, original vs changed
    order: Order = "delete"  # word importance of the textfooler search
    search: Search = "pwws"  # PWWS (Ren et al. 2019) or TextFooler's greedy search (Jin et al. 2020)
    pwws_step: PwwsStep = "rescore"  # each PWWS step re-picks the word's best candidate, or "fixed": the paper's w_i*
    part_of_speech: PartOfSpeech = "any"  # candidates from every WordNet sense, or the usual part of speech's
    whole_words: bool = True  # keep it's, film's, sad-sack whole; False cuts words at apostrophes and hyphens
    unknown_word: str = "[UNK]"  # PWWS's saliency replaces a word by this text (BERT tokenizers: their unknown token)
    texts_per_batch: int = 32  # texts attacked together, their queries batched; each gets what it would alone
    batch_size: int = 16  # texts per classifier or encoder call (on a CPU larger batches are no faster per text)

    def check(self) -> None:
        for name in ("max_candidates", "query_budget", "batch_size", "texts_per_batch"):
            require_steps(name, getattr(self, name))
        if not 0 < self.max_change <= 1:
            raise ValueError(f"max_change must be a share in (0, 1], got {self.max_change}")
        if not -1 <= self.similarity <= 1:
            raise ValueError(f"similarity must be a cosine in [-1, 1], got {self.similarity}")
        if self.order not in ("delete", "gradient"):
            raise ValueError(f"order must be 'delete' or 'gradient', got {self.order!r}")
        if self.search not in ("pwws", "textfooler"):
            raise ValueError(f"search must be 'pwws' or 'textfooler', got {self.search!r}")
        if self.pwws_step not in ("rescore", "fixed"):
            raise ValueError(f"pwws_step must be 'rescore' or 'fixed', got {self.pwws_step!r}")
        if self.part_of_speech not in ("any", "usual"):
            raise ValueError(f"part_of_speech must be 'any' or 'usual', got {self.part_of_speech!r}")
        if not self.unknown_word:
            raise ValueError("unknown_word must be a non-empty text, e.g. '[UNK]'")

    @property
    def description(self) -> str:
        """The search as a report names it, e.g. ``pwws (rescore steps)`` or ``textfooler (delete order)``."""
        return f"pwws ({self.pwws_step} steps)" if self.search == "pwws" else f"textfooler ({self.order} order)"


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
    flipped), ``"failed"`` (searched within the budgets, not flipped) or ``"untried"`` (the
    query budget cannot pay for the word ranking, so no search ran: never counted as robust).
    ``words`` counts the words the classifier sees (all of them unless truncated), of which
    ``changed_share`` is taken; ``queries`` counts classified texts; ``seconds`` is this text's share of the wall time
    of the batch it was attacked in; ``search`` names the search
    (:attr:`SynonymAttackConfig.description`).
    """

    text: str
    label: int
    status: str
    adversarial: str
    prediction: int
    queries: int
    words: int
    substitutions: tuple[Substitution, ...] = ()
    search: str = "pwws"
    seconds: float = 0.0

    @property
    def changed_share(self) -> float:
        return len(self.substitutions) / max(1, self.words)


@dataclass
class AttackSummary:
    """TextAttack's summary of a run over many texts, with the search that ran and its cost."""

    clean_accuracy: float
    accuracy_under_attack: float
    success_rate: float  # succeeded / (succeeded + failed)
    changed_share: float  # mean share of words changed, over successful attacks
    queries: float  # mean queries per attacked (not skipped) text
    examples: list[dict[str, object]] = field(default_factory=list)
    search: str = "pwws"  # which search produced the results, e.g. "pwws" or "textfooler (delete order)"
    seconds: float = 0.0  # mean wall seconds per text, skipped ones included
    untried: float = 0.0  # share of texts the query budget could not attack: neither robust nor broken

    @classmethod
    def of(cls, results: Sequence[AttackResult], keep: int = 5) -> AttackSummary:
        if not results:
            raise ValueError("no results to summarise: attack at least one text")
        succeeded = [r for r in results if r.status == "succeeded"]
        attacked = [r for r in results if r.status != "skipped"]
        tried = [r for r in attacked if r.status != "untried"]
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
            accuracy_under_attack=(len(tried) - len(succeeded)) / len(results),
            success_rate=len(succeeded) / len(tried) if tried else 0.0,
            changed_share=sum(r.changed_share for r in succeeded) / len(succeeded) if succeeded else 0.0,
            queries=sum(r.queries for r in attacked) / len(attacked) if attacked else 0.0,
            examples=examples,
            search=", ".join(dict.fromkeys(r.search for r in results)),
            seconds=sum(r.seconds for r in results) / len(results),
            untried=(len(attacked) - len(tried)) / len(results),
        )


def word_spans(text: str, whole_words: bool = True) -> list[tuple[int, int]]:
    """[start, end) character spans of the words of ``text``.

    A word is a run of letters and digits of any script (``naïve``, ``café`` with a combining
    accent), joined by apostrophes or hyphens to further ones (``it's``, ``film's``,
    ``sad-sack``, ``mid-90s``); with ``whole_words=False`` only the runs of ASCII letters,
    which cut those at the apostrophe, hyphen, digit or accented letter.
    """
    pattern = _WHOLE_WORD if whole_words else _LETTER_RUN
    return [match.span() for match in pattern.finditer(text)]


def visible_words(text: str, spans: Sequence[tuple[int, int]], seen_ids: SeenIds) -> int:
    """How many of ``text``'s leading words (``spans``) the classifier reads, a token of each at least.

    The count is the first c for which the text cut before word c (trailing spaces
    dropped) already gives the whole input, ``seen_ids(text[:start_c]) == seen_ids(text)``;
    all the words when no cut gives it. A cut past the truncation point reads as the whole
    text, so the test is monotone in c and a binary search finds it. Cost: about log2(W) + 1
    tokenizations, no model call.
    """
    whole = seen_ids([text])[0]
    low, high = 0, len(spans)  # the count lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if seen_ids([text[: spans[middle][0]].rstrip()])[0] == whole:
            high = middle
        else:
            low = middle + 1
    return low


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


@dataclass(frozen=True)
class _Classify:
    """A search's request: class probabilities [N, C] of these texts (each one query)."""

    texts: list[str]


@dataclass(frozen=True)
class _Encode:
    """A search's request: sentence embeddings [N, D] of these texts (no query)."""

    texts: list[str]


# A search is a generator: it yields requests, receives their answers and returns its result.
_Request = _Classify | _Encode
_Search = Generator[_Request, torch.Tensor, AttackResult]


class _Text:
    """One text under attack: its words, their candidates, the queries spent and the answers known."""

    def __init__(
        self, text: str, label: int, wordnet: WordNet, config: SynonymAttackConfig, seen_ids: SeenIds | None
    ) -> None:
        self.text, self.label, self.config = text, label, config
        self.spans = word_spans(text, config.whole_words)
        self.words = [text[s:e] for s, e in self.spans]
        self.visible = len(self.spans) if seen_ids is None else visible_words(text, self.spans, seen_ids)
        senses: Senses = "all" if config.part_of_speech == "any" else "usual"
        candidates = {
            i: [_cased_like(s, w) for s in wordnet.synonyms(w, senses)[: config.max_candidates]]
            for i, w in enumerate(self.words[: self.visible])
            if w.lower() not in STOP_WORDS
        }
        self.candidates = {i: c for i, c in candidates.items() if c}
        self.allowed = max(1, int(config.max_change * self.visible))
        self.queries = 0
        self.probabilities: dict[str, torch.Tensor] = {}  # text -> [C], every text classified so far
        self.embeddings: dict[str, torch.Tensor] = {}  # text -> [D]

    def left(self) -> int:
        return self.config.query_budget - self.queries

    def classify(self, texts: list[str]) -> Generator[_Request, torch.Tensor, torch.Tensor]:
        """[N, C] probabilities of ``texts``; one classified before costs no query. The caller keeps to the budget."""
        new = list(dict.fromkeys(t for t in texts if t not in self.probabilities))
        assert len(new) <= self.left()
        if new:
            self.queries += len(new)
            answers = yield _Classify(new)  # [N, C]
            if not 0 <= self.label < answers.shape[1]:
                raise ValueError(
                    f"label {self.label} of the text {self.text[:60]!r} is not one of the classifier's "
                    f"{answers.shape[1]} classes (0 to {answers.shape[1] - 1})"
                )
            self.probabilities.update(zip(new, answers, strict=True))
        return torch.stack([self.probabilities[t] for t in texts])

    def similar(self, texts: list[str]) -> Generator[_Request, torch.Tensor, list[bool]]:
        """Whether each text keeps cosine >= ``similarity`` to the original (no encoder call when -1)."""
        if self.config.similarity <= -1 or not texts:
            return [True] * len(texts)
        new = list(dict.fromkeys(t for t in [self.text, *texts] if t not in self.embeddings))
        if new:
            self.embeddings.update(zip(new, (yield _Encode(new)), strict=True))
        embedded = torch.stack([self.embeddings[t] for t in texts])  # [N, D]
        cosine = torch.nn.functional.cosine_similarity(embedded, self.embeddings[self.text][None], dim=-1)
        return (cosine >= self.config.similarity).tolist()

    def result(self, status: str, adversarial: str, prediction: int, chosen: dict[int, str]) -> AttackResult:
        substitutions = tuple(Substitution(j, self.words[j], chosen[j]) for j in sorted(chosen))
        return AttackResult(
            self.text,
            self.label,
            status,
            adversarial,
            prediction,
            self.queries,
            self.visible,
            substitutions,
            self.config.description,
        )


def _flip_or_lowest(probabilities: torch.Tensor, label: int) -> tuple[int, bool]:
    """The row to keep of [K, C]: among rows that flip the label the most confident flip, else the lowest P(label)."""
    flipped = (probabilities.argmax(-1) != label).nonzero().squeeze(1)
    if flipped.numel():
        return int(flipped[probabilities[flipped, label].argmin()]), True
    return int(probabilities[:, label].argmin()), False


def _pwws(state: _Text) -> _Search:
    """PWWS (see the module docstring) for one text."""
    text, spans, label, config = state.text, state.spans, state.label, state.config
    original = (yield from state.classify([text]))[0]
    prediction = int(original.argmax())
    if prediction != label:
        return state.result("skipped", text, prediction, {})
    positions = sorted(state.candidates)
    if not positions:
        return state.result("failed", text, prediction, {})
    if state.left() < len(positions):  # the saliency alone is over budget: no search can run
        return state.result("untried", text, prediction, {})
    unknown = [_replace(text, spans, {i: config.unknown_word}) for i in positions]
    saliency = original[label] - (yield from state.classify(unknown))[:, label]  # [P]
    best: dict[int, tuple[str, float]] = {}  # position -> (w*, ΔP*)
    for k in torch.argsort(saliency, descending=True, stable=True).tolist():
        i = positions[k]
        trials = [_replace(text, spans, {i: synonym}) for synonym in state.candidates[i]]
        similar = yield from state.similar(trials)
        kept = [(t, s) for t, s, ok in zip(trials, state.candidates[i], similar, strict=True) if ok]
        kept = kept[: state.left()]
        if not kept:
            continue
        probabilities = yield from state.classify([t for t, _ in kept])  # [K, C]
        row, flipped = _flip_or_lowest(probabilities, label)
        if flipped:
            return state.result("succeeded", kept[row][0], int(probabilities[row].argmax()), {i: kept[row][1]})
        best[i] = (kept[row][1], float(original[label] - probabilities[row, label]))
    weights = torch.softmax(saliency, dim=0)  # [P]
    scored = [i for i in positions if i in best]
    scores = torch.tensor([float(weights[positions.index(i)]) * best[i][1] for i in scored])  # H, [P']
    ranked = [scored[k] for k in torch.argsort(scores, descending=True, stable=True).tolist()]
    if config.pwws_step == "rescore":
        return (yield from _greedy(state, ranked, float(original[label]), prediction))
    chosen: dict[int, str] = {}
    for i in ranked:
        if len(chosen) >= state.allowed:
            break
        trial = _replace(text, spans, {**chosen, i: best[i][0]})
        if not (yield from state.similar([trial]))[0]:
            continue
        if trial not in state.probabilities and state.left() < 1:
            break
        probabilities = (yield from state.classify([trial]))[0]
        chosen[i] = best[i][0]
        if int(probabilities.argmax()) != label:
            return state.result("succeeded", trial, int(probabilities.argmax()), chosen)
    return state.result("failed", _replace(text, spans, dict(chosen)), prediction, chosen)


def _textfooler(state: _Text, gradient_importance: GradientImportance | None) -> _Search:
    """TextFooler's greedy search (see the module docstring) for one text."""
    text, spans, label, config = state.text, state.spans, state.label, state.config
    probabilities = (yield from state.classify([text]))[0]
    prediction = int(probabilities.argmax())
    if prediction != label:
        return state.result("skipped", text, prediction, {})
    positions = sorted(state.candidates)
    if not positions:
        return state.result("failed", text, prediction, {})
    if config.order == "gradient":
        if gradient_importance is None:
            raise ValueError("order='gradient' needs gradient_importance(text, spans, label)")
        if state.left() < 1:
            return state.result("untried", text, prediction, {})
        state.queries += 1  # one forward and backward
        scores = gradient_importance(text, spans, label)[positions]  # [P]
    else:
        if state.left() < len(positions):
            return state.result("untried", text, prediction, {})
        deleted = [_replace(text, spans, {i: None}) for i in positions]
        scores = -(yield from state.classify(deleted))[:, label]  # [P]: lower P(label) when deleted, more important
    ranked = [positions[k] for k in torch.argsort(scores, descending=True, stable=True).tolist()]
    return (yield from _greedy(state, ranked, float(probabilities[label]), prediction))


def _greedy(state: _Text, ranked: list[int], current: float, prediction: int) -> _Search:
    """Each word of ``ranked`` in turn: its candidates on top of the changes so far, the best one kept if it
    lowers P(label) (``current``, the unchanged text's), until the prediction flips or a budget runs out."""
    text, spans, label = state.text, state.spans, state.label
    chosen: dict[int, str] = {}
    for i in ranked:
        if len(chosen) >= state.allowed or state.left() <= 0:
            break
        trials = [_replace(text, spans, {**chosen, i: synonym}) for synonym in state.candidates[i]]
        similar = yield from state.similar(trials)
        kept = [(t, s) for t, s, ok in zip(trials, state.candidates[i], similar, strict=True) if ok]
        kept = kept[: state.left()]
        if not kept:
            continue
        trial_probabilities = yield from state.classify([t for t, _ in kept])  # [K, C]
        row, flipped = _flip_or_lowest(trial_probabilities, label)
        if not flipped and float(trial_probabilities[row, label]) >= current:
            continue
        chosen[i] = kept[row][1]
        current = float(trial_probabilities[row, label])
        if flipped:
            return state.result("succeeded", kept[row][0], int(trial_probabilities[row].argmax()), chosen)
    return state.result("failed", _replace(text, spans, dict(chosen)), prediction, chosen)


def _answer(
    function: Callable[[Sequence[str]], torch.Tensor], requests: list[list[str]], batch_size: int, name: str
) -> list[torch.Tensor]:
    """Each request's rows of ``function`` on all their texts, sorted by length so that batches pad little,
    ``batch_size`` texts per call; ``name`` (``"classify"``, ``"encode"``) names it when it answers wrongly."""
    texts = [t for request in requests for t in request]
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    ordered = [texts[k] for k in order]
    answers = torch.cat(
        [_checked(function, ordered[k : k + batch_size], name) for k in range(0, len(ordered), batch_size)]
    )
    rows = torch.empty_like(answers)
    rows[torch.tensor(order)] = answers
    return list(rows.split([len(request) for request in requests]))


def _checked(function: Callable[[Sequence[str]], torch.Tensor], texts: list[str], name: str) -> torch.Tensor:
    """``function(texts)``, raising unless it is finite with one row per text (of two classes at least for
    ``classify``)."""
    answer = function(texts)
    if not isinstance(answer, torch.Tensor) or answer.dim() != 2 or answer.shape[0] != len(texts):
        got = tuple(answer.shape) if isinstance(answer, torch.Tensor) else type(answer).__name__
        raise ValueError(f"{name} returned {got} for {len(texts)} texts; it must return one row per text, [N, C]")
    if answer.shape[1] < (2 if name == "classify" else 1) or not bool(torch.isfinite(answer).all()):
        raise ValueError(
            f"{name} returned {answer.shape[1]} values per text, finite: {bool(torch.isfinite(answer).all())}, "
            f"for texts such as {texts[0][:60]!r}; it must return finite values (class probabilities: two at least)"
        )
    return answer


def attack_text(
    text: str,
    label: int,
    classify: Classify,
    encode: Encode,
    wordnet: WordNet,
    config: SynonymAttackConfig,
    gradient_importance: GradientImportance | None = None,
    seen_ids: SeenIds | None = None,
) -> AttackResult:
    """Attack one text; see the module docstring for the searches and their constraints."""
    return attack_texts([text], [label], classify, encode, wordnet, config, gradient_importance, seen_ids)[0]


def attack_texts(
    texts: Sequence[str],
    labels: Sequence[int],
    classify: Classify,
    encode: Encode,
    wordnet: WordNet,
    config: SynonymAttackConfig,
    gradient_importance: GradientImportance | None = None,
    seen_ids: SeenIds | None = None,
    finished: Callable[[AttackResult], object] | None = None,
) -> list[AttackResult]:
    """:func:`attack_text` for each (text, label), ``config.texts_per_batch`` texts at a time.

    ``seen_ids``: the classifier's token ids of each text after its truncation, so that
    only the words it reads are attacked and counted; None: it reads every word.
    ``finished``: called with each result as its batch ends (a progress bar).

    The texts of a batch advance together: every round, the classification requests of all
    of them go to one ``classify`` call and the encoding requests to one ``encode`` call,
    and a text leaves as soon as its search ends (a flip, the budgets, or its words spent).
    """
    config.check()
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of texts, got one str; pass [text]")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    for k, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if not isinstance(text, str):
            raise TypeError(f"texts[{k}] must be a str, got {type(text).__name__}")
        _class_id(label, f"labels[{k}]")
    if config.search == "textfooler" and config.order == "gradient" and gradient_importance is None:
        raise ValueError("order='gradient' needs gradient_importance(text, spans, label)")
    results: list[AttackResult] = []
    for start in range(0, len(texts), config.texts_per_batch):
        batch = range(start, min(start + config.texts_per_batch, len(texts)))
        began = time.perf_counter()
        states = [_Text(texts[k], operator.index(labels[k]), wordnet, config, seen_ids) for k in batch]
        ended = _run_together(
            [_pwws(state) if config.search == "pwws" else _textfooler(state, gradient_importance) for state in states],
            classify,
            encode,
            config.batch_size,
        )
        share = (time.perf_counter() - began) / len(batch)
        for result in ended:
            results.append(dataclasses.replace(result, seconds=share))
            if finished is not None:
                finished(results[-1])
    return results


def _class_id(value: Any, where: str) -> int:
    """``value`` as a class id (an int or integer scalar >= 0), else raise naming ``where``."""
    try:
        index = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        index = None
    if index is None:
        raise TypeError(f"{where} must be a class id, an int >= 0, got {value!r}")
    if index < 0:
        raise ValueError(f"{where} must be a class id >= 0, got {index}")
    return index


def _run_together(searches: list[_Search], classify: Classify, encode: Encode, batch_size: int) -> list[AttackResult]:
    """Drive the searches in rounds, answering each round's requests with one call per kind."""
    results: list[AttackResult | None] = [None] * len(searches)
    pending: dict[int, _Request] = {}

    def advance(k: int, answer: torch.Tensor | None) -> None:
        try:
            pending[k] = next(searches[k]) if answer is None else searches[k].send(answer)
        except StopIteration as stop:
            results[k] = stop.value

    function_name = {_Classify: "classify", _Encode: "encode"}
    for k in range(len(searches)):
        advance(k, None)
    while pending:
        asked = list(pending.items())
        pending.clear()
        for kind, function in ((_Classify, classify), (_Encode, encode)):
            mine = [(k, r) for k, r in asked if isinstance(r, kind)]
            if mine:
                answers = _answer(function, [r.texts for _, r in mine], batch_size, function_name[kind])
                for (k, _), answer in zip(mine, answers, strict=True):
                    advance(k, answer)
    return [r for r in results if r is not None]
