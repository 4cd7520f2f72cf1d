"""The synonym table: single-token words and synonyms only, one row per token id, from a word list or WordNet."""

from __future__ import annotations

import pytest
from transformers import BertTokenizerFast

from advfunc.words.synonym_table import from_words, wordnet_table

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "good",
    "fine",
    "great",
    "film",
    "movie",
    "bad",
    "poor",
    "ex",
    "##cellent",
    "new",
]


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True)


def synonyms_of(table, tokenizer, word):
    row = tokenizer.convert_tokens_to_ids(word)
    return tokenizer.convert_ids_to_tokens(table.ids[row][table.mask[row]].tolist())


def test_a_word_list_keeps_single_token_words_and_synonyms_in_order(tokenizer):
    table = from_words(
        tokenizer,
        {"good": ["fine", "excellent", "great", "fine", "good"], "movie": ["film"], "excellent": ["good"]},
        width=4,
    )
    assert table.ids.shape == (len(tokenizer), 4) and table.mask.shape == (len(tokenizer), 4)
    # "excellent" is two tokens; the repeat and the word itself are dropped
    assert synonyms_of(table, tokenizer, "good") == ["fine", "great"]
    assert synonyms_of(table, tokenizer, "movie") == ["film"]
    assert synonyms_of(table, tokenizer, "bad") == []
    assert int(table.mask.sum()) == 3


def test_width_cuts_the_row_and_bad_widths_are_refused(tokenizer):
    table = from_words(tokenizer, {"good": ["fine", "great", "new"]}, width=2)
    assert synonyms_of(table, tokenizer, "good") == ["fine", "great"]
    with pytest.raises(ValueError, match="width"):
        from_words(tokenizer, {"good": ["fine"]}, width=0)


def test_vocab_size_sets_the_rows(tokenizer):
    assert from_words(tokenizer, {"good": ["fine"]}, vocab_size=20).ids.shape[0] == 20


def test_wordnet_table_finds_wordnet_synonyms_among_whole_word_tokens(tokenizer):
    table = wordnet_table(tokenizer)
    assert "film" in synonyms_of(table, tokenizer, "movie")
    assert "movie" in synonyms_of(table, tokenizer, "film")
    assert synonyms_of(table, tokenizer, "##cellent") == []  # a word piece is no word
