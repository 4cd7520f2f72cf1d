"""The synonym table of a tokenizer, built once: ``[V, K]`` synonym token ids and a ``[V, K]`` mask.

ASCC and DNE (:func:`advfunc.attacks.ascc`, :func:`advfunc.attacks.dne`) move each token's
embedding inside the hull of its synonyms' embeddings, so a synonym must be one token of
the model's vocabulary: words and synonyms that the tokenizer splits into several tokens
are left out. Row v lists the synonyms of token v in the order given, each once, at most
``width`` of them; a token with none has an all-False row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from advfunc.attacks.synonyms import SynonymTable
from advfunc.words.wordnet import Senses, WordNet


def single_tokens(tokenizer: Any, words: Iterable[str]) -> dict[str, int]:
    """``{word: token id}`` for the words ``tokenizer`` encodes as exactly one token, not a special one.

    A word outside the vocabulary encodes as the unknown token, which is not that word.
    """
    words = list(dict.fromkeys(words))
    if not words:
        return {}
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return {word: ids[0] for word, ids in zip(words, encoded, strict=True) if len(ids) == 1 and ids[0] not in special}


def from_words(
    tokenizer: Any, synonyms: Mapping[str, Iterable[str]], width: int = 16, vocab_size: int | None = None
) -> SynonymTable:
    """The table of a ``{word: [synonyms]}`` mapping for ``tokenizer``: single-token words and synonyms only.

    ``vocab_size``: the rows of the model's input embedding (default ``len(tokenizer)``).
    Cost: one batched tokenizer call over every word and synonym.
    """
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width (synonyms kept per token) must be an integer >= 1, got {width!r}")
    rows = len(tokenizer) if vocab_size is None else vocab_size
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"vocab_size must be a positive integer (the input embedding's rows), got {vocab_size!r}")
    listed = {word: list(found) for word, found in synonyms.items()}
    token_of = single_tokens(tokenizer, [*listed, *(s for found in listed.values() for s in found)])
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for word, found in listed.items():
        token = token_of.get(word)
        if token is None or token >= rows:
            continue
        kept = list(dict.fromkeys(token_of[s] for s in found if s in token_of and token_of[s] != token))
        kept = [t for t in kept if t < rows][:width]
        present = mask[token].sum()
        room = kept[: width - int(present)]
        ids[token, int(present) : int(present) + len(room)] = torch.tensor(room, dtype=torch.long)
        mask[token, int(present) : int(present) + len(room)] = True
    return SynonymTable(ids, mask)


def wordnet_table(
    tokenizer: Any,
    wordnet: WordNet | None = None,
    width: int = 16,
    senses: Senses = "usual",
    vocab_size: int | None = None,
) -> SynonymTable:
    """The WordNet 3.0 synonyms (:meth:`WordNet.synonyms`) of every alphabetic token of ``tokenizer``'s vocabulary.

    A token qualifies when its text is letters only and the tokenizer encodes that text
    back to the same single token (so WordPiece continuations such as ``##ing`` and
    byte-level pieces do not). Cost: one WordNet lookup per qualifying token and two
    batched tokenizer calls.
    """
    wordnet = WordNet() if wordnet is None else wordnet
    candidates = {token: index for token, index in tokenizer.get_vocab().items() if token.isalpha()}
    own = single_tokens(tokenizer, candidates)
    words = [word for word, token in own.items() if candidates.get(word) == token]
    return from_words(tokenizer, {word: wordnet.synonyms(word, senses) for word in words}, width, vocab_size)
