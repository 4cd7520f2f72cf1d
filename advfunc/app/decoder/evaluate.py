"""A causal LM's answers to a two-class instruction task (the larger of the two answers' first-token logits
after the prompt): clean, under prompt-embedding PGD, under synonyms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import advfunc
from advfunc.app.common.data import Encoded
from advfunc.app.decoder.data import Answers, batch, prompts
from advfunc.attacks.robustness import EvalMode, chunks, pgd_logits, survivors_over_radii


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B] the prompt's last position of each row: the one before its first labelled token."""
    return (labels != -100).int().argmax(dim=1) - 1


def answer_logits(logits: torch.Tensor, labels: torch.Tensor, answers: Answers) -> torch.Tensor:
    """[B, 2] the logits of the two answers' first tokens at the prompt's last position (logits [B, L, V])."""
    at = logits[torch.arange(len(logits), device=logits.device), answer_positions(labels)]  # [B, V]
    return at[:, list(answers.first)].float()


def answer_scores(model: nn.Module, data: Encoded, answers: Answers, batch_size: int = 32) -> torch.Tensor:
    """[N, 2] the two answers' first-token logits after each prompt (eval mode, no gradients)."""
    found = []
    with EvalMode(model), torch.inference_mode():
        for indices in chunks(list(range(len(data))), batch_size):
            inputs = batch(data, answers, indices, adversary=False)
            found.append(answer_logits(model(**inputs).logits, inputs["labels"], answers))
    return torch.cat(found)


def correct(model: nn.Module, data: Encoded, answers: Answers, batch_size: int = 32) -> torch.Tensor:
    """[N] bool: whether the model answers each prompt with its class's answer."""
    return answer_scores(model, data, answers, batch_size).argmax(-1).cpu() == torch.tensor(data.labels)


def robust_accuracy(
    model: nn.Module,
    data: Encoded,
    answers: Answers,
    radii: Sequence[float],
    steps: int,
    batch_size: int = 16,
    clean: torch.Tensor | None = None,
) -> tuple[float, dict[float, float]]:
    """(clean accuracy, {radius: accuracy under L2 PGD on the prompt's input embeddings against the correct answer
    within that radius}) on ``data``; ``clean``: [N] bool, :func:`correct` of ``data`` when the caller has it."""
    params = advfunc.params_of(model)
    clean = correct(model, data, answers, batch_size) if clean is None else clean

    def holds(indices: list[int], radius: float) -> torch.Tensor:
        inputs = batch(data, answers, indices, adversary=False)
        _, logits = pgd_logits(model, params, inputs, radius, steps, "embeds@prompt")
        return answer_logits(logits, inputs["labels"], answers).argmax(-1) == torch.tensor(data.labels)[indices]

    with EvalMode(model):
        return float(clean.float().mean()), survivors_over_radii(clean, radii, holds, lambda ix: chunks(ix, batch_size))


@dataclass(frozen=True)
class DecoderVictim:
    """A causal LM as the two-class classifier the synonym attack queries: ``[N] texts -> [N, 2]``, the softmax of
    the two answers' first-token logits after each text's prompt."""

    model: nn.Module
    tokenizer: Any
    answers: Answers
    max_length: int

    def seen_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """[N] each text's prompt as the model reads it: the review cut so that prompt and answer fit."""
        return prompts(texts, [0] * len(texts), self.tokenizer, self.answers, self.max_length).input_ids

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        data = prompts(texts, [0] * len(texts), self.tokenizer, self.answers, self.max_length)
        return torch.softmax(answer_scores(self.model, data, self.answers), dim=-1)
