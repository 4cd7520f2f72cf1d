"""A two-class text task as instructions for a causal LM: the prompt ``"Review: {text}\\nSentiment:"`` (plain, or
the user turn of the chat template; why plain: ``docs/decoders.md``), each label an answer word, the loss on the
answer only and ``adv_labels`` the wrong answer (CAT, LAT). The review is cut, never the instruction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from advfunc.app.common.data import DataError, Encoded, Labels, TextDataset, pad_id
from advfunc.core.completion import ADV_LABELS
from advfunc.hf.chat import Message, completion_batch, render, reply_ids, token_ids

PROMPT_HEAD = "Review:"
PROMPT_TAIL = "\nSentiment:"
ROTTEN_TOMATOES_ANSWERS = {"fresh": " positive", "rotten": " negative"}


@dataclass(frozen=True)
class Answers:
    """The two labels in class order and the token ids of their answers (class i answers ``ids[i]``)."""

    labels: tuple[str, ...]
    words: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    chat: bool = False

    @classmethod
    def of(cls, words: Mapping[str, str], tokenizer: Any, chat: bool = False) -> Answers:
        """Tokenize each label's answer word (``chat``: its assistant turn); their first tokens must differ, as the
        answer is a next-token choice."""
        if len(words) != 2:
            raise DataError(f"the decoder task has two answers, got {len(words)}: {dict(words)}; give LABEL=WORD twice")
        if chat:
            ids = tuple(tuple(_reply(tokenizer, _instruction(""), word)) for word in words.values())
        else:
            ids = tuple(tuple(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in words.values())
        empty = [word for word, tokens in zip(words.values(), ids, strict=True) if not tokens]
        if empty:
            raise DataError(f"answer {empty[0]!r} tokenizes to nothing; choose another answer word")
        if ids[0][0] == ids[1][0]:
            raise DataError(
                f"answers {list(words.values())} begin with the same token {ids[0][0]}, so the next token cannot "
                "tell them apart; choose answer words that start differently"
            )
        return cls(tuple(words), tuple(words.values()), ids, chat)

    @property
    def first(self) -> tuple[int, ...]:
        """The first token of each class's answer: the two logits the answer is read from."""
        return tuple(tokens[0] for tokens in self.ids)

    def encode_labels(self, dataset: TextDataset) -> list[int]:
        """Class ids of ``dataset``; ``DataError`` naming the first label without an answer word."""
        answers = dict(zip(self.labels, self.words, strict=True))
        return Labels(self.labels).encode(dataset, f"the answers are {answers} (set them with --answer LABEL=WORD)")


def _instruction(review: str) -> list[Message]:
    return [{"role": "user", "content": f"{PROMPT_HEAD}{review}{PROMPT_TAIL}"}]


def _reply(tokenizer: Any, prompt: list[Message], word: str) -> list[int]:
    """The assistant turn answering ``word`` (its leading space is the plain prompt's, not the turn's)."""
    return reply_ids(tokenizer, prompt, word.strip(), "answer")


def prompts(texts: Sequence[str], classes: Sequence[int], tokenizer: Any, answers: Answers, max_length: int) -> Encoded:
    """``"Review: {text}\\nSentiment:"`` as tokens, the review cut so that prompt and answer fit ``max_length``
    (``answers.chat``: the rendered user turn, the review cut by tokens and written back as text)."""
    if answers.chat:
        head = token_ids(tokenizer, render(tokenizer, _instruction(""), generation_prompt=True))
        tail: list[int] = []
    else:
        head = tokenizer(PROMPT_HEAD, add_special_tokens=False)["input_ids"]
        tail = tokenizer(PROMPT_TAIL, add_special_tokens=False)["input_ids"]
    answer = max(len(ids) for ids in answers.ids)
    room = max_length - len(head) - len(tail) - answer
    if room < 1:
        raise DataError(
            f"max length {max_length} leaves no token for the review after the instruction "
            f"({len(head) + len(tail)} tokens) and the answer; raise it"
        )
    if not texts:
        raise DataError("no texts to encode: there is nothing to train or evaluate on")
    bodies = tokenizer([" " + text for text in texts], add_special_tokens=False)["input_ids"]
    if not answers.chat:
        ids = [head + body[:room] + tail for body in bodies]
    else:
        ids = [_chat_prompt(tokenizer, answers, body[:room], max_length - answer) for body in bodies]
    return Encoded(ids, None, list(classes), pad_id(tokenizer))


def _chat_prompt(tokenizer: Any, answers: Answers, body: list[int], width: int) -> list[int]:
    """The rendered instruction holding the review ``body``, cut further while it renders to more than ``width``
    ids (the instruction alone fits: :func:`prompts` checked it)."""
    while True:
        prompt = _instruction(" " + str(tokenizer.decode(body)).strip() if body else "")
        ids = token_ids(tokenizer, render(tokenizer, prompt, generation_prompt=True))
        if len(ids) <= width or not body:
            break
        body = body[:-1]
    replies = tuple(tuple(_reply(tokenizer, prompt, word)) for word in answers.words)
    if replies != answers.ids:
        raise DataError(
            "the chat template renders the answers differently after different reviews; the decoder task "
            "needs answers that do not depend on the prompt (leave --chat-template out)"
        )
    return ids


def batch(data: Encoded, answers: Answers, indices: Sequence[int], adversary: bool) -> dict[str, torch.Tensor]:
    """Rows ``indices`` as model arguments (:func:`advfunc.hf.chat.completion_batch`): prompt + answer, labels
    on the answer only; ``adversary`` adds ``adv_labels``, the other class's answer after the prompt."""
    rows = [(data.input_ids[i], answers.ids[data.labels[i]], answers.ids[1 - data.labels[i]]) for i in indices]
    return {k: v for k, v in completion_batch(rows, data.pad_id).items() if adversary or k != ADV_LABELS}
