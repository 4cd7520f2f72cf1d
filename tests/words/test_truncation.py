"""A text longer than the classifier reads: only the words it reads are attacked, and only they are counted."""

from __future__ import annotations

import re

import pytest
import torch

from advfunc.words.synonym_attack import SynonymAttackConfig, attack_text, visible_words, word_spans
from tests.words.test_pwws import SYNONYMS, WEIGHTS, Linear, Thesaurus, letters

READS = 8  # words the truncating classifier reads


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class Truncating(Linear):
    """:class:`Linear` on the first ``READS`` words only, and those words' ids as what it reads."""

    queried: list[str]

    def __call__(self, texts) -> torch.Tensor:
        self.queried = [*getattr(self, "queried", []), *texts]
        return super().__call__([" ".join(_words(t)[:READS]) for t in texts])

    def seen_ids(self, texts) -> list[list[int]]:
        return [[101, *(sum(map(ord, w)) for w in _words(t)[:READS]), 102] for t in texts]


@pytest.mark.parametrize(
    "search", [{"pwws_step": "rescore"}, {"pwws_step": "fixed"}, {"search": "textfooler", "order": "delete"}]
)
def test_only_the_words_the_classifier_reads_are_attacked_and_counted(search):
    read = "alpha beta gamma delta alpha beta gamma delta"
    unread = " alpha beta gamma delta" * 3  # 12 more words with synonyms, past the classifier's truncation
    text = read + unread
    config = SynonymAttackConfig(similarity=-1.0, max_change=0.25, **search)
    model = Truncating(WEIGHTS)
    result = attack_text(text, 1, model, letters, Thesaurus(SYNONYMS), config, seen_ids=model.seen_ids)  # type: ignore[arg-type]
    assert result.words == READS
    assert all(s.index < READS for s in result.substitutions)
    assert len(result.substitutions) <= int(0.25 * READS)
    assert result.changed_share == len(result.substitutions) / READS
    tail = _words(text)[READS:]
    changed_unread = [t for t in model.queried if _words(t)[-len(tail) :] != tail]
    assert changed_unread == [], "a query changed a word the model never reads"
    # Without the truncation the same search attacks and counts all 20 words.
    whole = attack_text(text, 1, Linear(WEIGHTS), letters, Thesaurus(SYNONYMS), config)  # type: ignore[arg-type]
    assert whole.words == 20


def test_visible_words_are_those_with_a_token_inside_the_truncation(tmp_path):
    """Against the tokenizer's own offsets: a word counts when a token the model keeps starts inside it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from advfunc.words.victim import Victim
    from tests.support.tiny_task import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    text = "The moving films, the boringest plot... and goodly acting; a fine-story cast was dull."
    spans = word_spans(text)
    for max_length in range(3, 40):
        victim = Victim(model, tokenizer, max_length=max_length)
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        kept = [(s, e) for s, e in encoded["offset_mapping"] if e > s]  # special tokens have empty spans
        oracle = sum(any(s < w_end and e > w_start for s, e in kept) for w_start, w_end in spans)
        assert visible_words(text, spans, victim.seen_ids) == oracle, max_length
    assert visible_words(text, spans, Victim(model, tokenizer, max_length=64).seen_ids) == len(spans)
    assert visible_words("", [], Victim(model, tokenizer, max_length=4).seen_ids) == 0
