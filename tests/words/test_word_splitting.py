"""Words are whole words: contractions, possessives and hyphenated compounds are never cut into fragments."""

from __future__ import annotations

import re
from typing import ClassVar

import pytest
import torch

from advfunc.words.synonym_attack import SynonymAttackConfig, attack_text, word_spans


def words_of(text: str, whole_words: bool = True) -> list[str]:
    return [text[s:e] for s, e in word_spans(text, whole_words)]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("It's still terrible!", ["It's", "still", "terrible"]),
        ("This isn't funny.", ["This", "isn't", "funny"]),
        ("The film's ending works.", ["The", "film's", "ending", "works"]),
        ("A sad-sack hero, well-meaning but dull.", ["A", "sad-sack", "hero", "well-meaning", "but", "dull"]),
        ("you\u2019re right", ["you\u2019re", "right"]),  # the typographic apostrophe of the corpus
        ("its characters' wounds -- and 'quotes'", ["its", "characters", "wounds", "and", "quotes"]),
        ("Rock'n'roll, mid-90s fun in 1999", ["Rock'n'roll", "mid-90s", "fun", "in", "1999"]),
    ],
)
def test_contractions_possessives_and_compounds_stay_whole(text, words):
    assert words_of(text) == words


def test_the_letter_run_option_cuts_them_as_before():
    cut = ["It", "s", "a", "sad", "sack", "film", "s", "mid", "s"]
    assert words_of("It's a sad-sack film's mid-90s", whole_words=False) == cut


class Thesaurus:
    """Synonyms for the fragments a letter-run split would make, and for one whole word."""

    table: ClassVar[dict[str, list[str]]] = {
        "s": ["second"],
        "t": ["metric_ton", "mt"],
        "sad": ["deplorable"],
        "sack": ["bag"],
        "hero": ["champion"],
    }

    def synonyms(self, word: str, senses: str = "usual") -> list[str]:
        return [s for s in self.table.get(word.lower(), []) if s.isalpha()]


def fragments_decide(texts) -> torch.Tensor:
    """Class 1 the more "s", "t", "sad" and "sack" letter runs the text holds; class 0 with none."""
    counts = torch.tensor(
        [sum(w in {"s", "t", "sad", "sack"} for w in re.findall(r"[a-z]+", t.lower())) for t in texts]
    )
    return torch.softmax(torch.stack([torch.zeros(len(texts)), 2.0 * counts - 1.0], dim=1), dim=1)


def letters(texts) -> torch.Tensor:
    return torch.ones(len(texts), 3)


@pytest.mark.parametrize("search", ["pwws", "textfooler"])
def test_the_attack_never_rewrites_a_fragment_of_a_word(search):
    config = SynonymAttackConfig(similarity=-1.0, max_change=1.0, search=search)
    for text in ["It's still a sad-sack hero.", "This isn't the film's hero."]:
        result = attack_text(text, 1, fragments_decide, letters, Thesaurus(), config)  # type: ignore[arg-type]
        assert result.status == "failed"  # only "hero" may change, and it decides nothing
        assert {s.original for s in result.substitutions} <= {"hero"}
        assert len(words_of(result.adversarial)) == len(words_of(text))
        cut = dict(config.__dict__, whole_words=False)
        old = attack_text(text, 1, fragments_decide, letters, Thesaurus(), SynonymAttackConfig(**cut))  # type: ignore[arg-type]
        assert old.status == "succeeded"  # cut at the apostrophe or hyphen, a fragment is rewritten
        assert re.search(r"'second|'mt|deplorable-|-bag", old.adversarial), old.adversarial
