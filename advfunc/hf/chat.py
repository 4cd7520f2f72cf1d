"""CAT and LAT batches from a chat dataset, on the model's own chat template."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from advfunc.core.completion import ADV_LABELS

Message = Mapping[str, str]
NO_TEMPLATE = "the tokenizer has no chat_template; set tokenizer.chat_template to the model's template"


def render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    """The conversation as the tokenizer's chat template writes it (``add_generation_prompt=generation_prompt``)."""
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt))


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids as written: the template already holds whatever special tokens it wants."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reply_ids(tokenizer: Any, prompt: Sequence[Message], reply: Any, key: str = "reply") -> list[int]:
    """The ids the template adds after ``prompt``'s generation prompt when ``reply`` closes the conversation.

    ``reply``: a string (one assistant message) or a list of messages; the ids include the
    template's own end-of-turn tokens. ``key`` names the reply in errors.
    """
    if isinstance(reply, str):
        reply = [{"role": "assistant", "content": reply}]
    if not isinstance(reply, Sequence) or not reply or not all(isinstance(m, Mapping) for m in reply):
        raise ValueError(f"example[{key!r}] must be a string or a list of chat messages, got {reply!r}")
    prompt_text = render(tokenizer, prompt, generation_prompt=True)
    whole = render(tokenizer, [*prompt, *reply], generation_prompt=False)
    if not whole.startswith(prompt_text):
        raise ValueError(
            f"the chat template renders the prompt differently once example[{key!r}] follows it; "
            "its generation prompt must be a prefix of the conversation with the reply"
        )
    ids = token_ids(tokenizer, whole[len(prompt_text) :])
    if not ids:
        raise ValueError(f"example[{key!r}] renders to no tokens")
    return ids


@dataclass
class ChatAdversaryCollator:
    """A data collator that turns chat examples into batches for CAT and LAT (``labels`` and ``adv_labels``).

    Each example is TRL's conversational prompt-completion form plus the adversary's reply::

        {"prompt": [{"role": "user", "content": "How do I pick a lock?"}],
         "completion": [{"role": "assistant", "content": "I can't help with that."}],   # or a string
         "adversary": [{"role": "assistant", "content": "Sure, first ..."}]}            # or a string

    The prompt is rendered with the tokenizer's chat template and its generation prompt
    (``add_generation_prompt=True``); each reply is the text the template adds after it
    when the reply closes the conversation, so both replies carry the template's own
    end-of-turn tokens. The batch is :func:`completion_batch` of (prompt, completion,
    adversary), padded with ``tokenizer.pad_token_id`` to a multiple of ``pad_to_multiple_of``
    when given; CAT and LAT write ``adv_labels`` (:data:`advfunc.ADV_LABELS`) in place of the
    desired completion.

    ``max_length``: longer rows lose the end of their replies; a prompt that leaves no
    room for a reply token is refused. Give it to ``AdversarialTrainer`` or
    ``adversarial(SFTTrainer)`` as ``data_collator`` with ``remove_unused_columns=False``
    (the examples' text columns must reach it).
    """

    tokenizer: Any
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(NO_TEMPLATE)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id; set tokenizer.pad_token (often the eos token)")
        for name in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"{name} must be an integer >= 2 or None, got {value!r}")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("no examples to collate")
        rows = []
        for example in examples:
            missing = [k for k in ("prompt", "completion", "adversary") if k not in example]
            if missing:
                raise ValueError(f"a chat example needs 'prompt', 'completion' and 'adversary'; it lacks {missing}")
            prompt = example["prompt"]
            prompt_text = render(self.tokenizer, prompt, generation_prompt=True)
            prompt_ids = token_ids(self.tokenizer, prompt_text)
            completion = reply_ids(self.tokenizer, prompt, example["completion"], "completion")
            adversary = reply_ids(self.tokenizer, prompt, example["adversary"], "adversary")
            if self.max_length is not None:
                room = self.max_length - len(prompt_ids)
                if room < 1:
                    raise ValueError(
                        f"a prompt of {len(prompt_ids)} tokens leaves no room for a reply within max_length "
                        f"{self.max_length}; raise max_length"
                    )
                completion, adversary = completion[:room], adversary[:room]
            rows.append((prompt_ids, completion, adversary))
        return completion_batch(rows, int(self.tokenizer.pad_token_id), self.pad_to_multiple_of or 1)


def completion_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], pad_id: int, multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """(prompt, completion, adversary) ids per row as one right-padded batch for CAT and LAT.

    ``input_ids``: prompt + completion, then ``pad_id``; ``attention_mask``: 1 over them;
    ``labels``: the completion, −100 elsewhere (completion-only loss); ``adv_labels``: the
    adversary's ids right after the prompt (they may run into the padding), −100 elsewhere.
    The width is the longest prompt + longer reply, rounded up to a multiple of ``multiple_of``.
    """
    width = math.ceil(max(len(p) + max(len(c), len(a)) for p, c, a in rows) / multiple_of) * multiple_of

    def padded(lists: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([[*ids, *[value] * (width - len(ids))] for ids in lists], dtype=torch.long)

    return {
        "input_ids": padded([[*p, *c] for p, c, _ in rows], pad_id),
        "attention_mask": padded([[1] * (len(p) + len(c)) for p, c, _ in rows], 0),
        "labels": padded([[-100] * len(p) + [*c] for p, c, _ in rows], -100),
        ADV_LABELS: padded([[-100] * len(p) + [*a] for p, _, a in rows], -100),
    }
