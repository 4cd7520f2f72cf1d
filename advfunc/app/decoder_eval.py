"""A causal LM's answers to a two-class instruction task: clean, under prompt-embedding PGD, under synonyms.

The model's answer is the next-token choice between the two answers' first tokens at the
prompt's last position (the logit of each; the larger one is the answer). Robust accuracy
at radius r counts an example as correct when it is answered correctly clean and no PGD
attack at any radius r' ≤ r changed its answer (as :mod:`advfunc.app.evaluate` counts it
for classifiers), so it never rises with the radius.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.app.decoder_data import Answers, Prompts, batch, prompts
from advfunc.app.evaluate import EvalMode
from advfunc.core.model import logits_of
from advfunc.core.params import params_of
from advfunc.core.step import prepare


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B] the prompt's last position of each row: the one before its first labelled token."""
    return (labels != -100).int().argmax(dim=1) - 1


def answer_logits(logits: torch.Tensor, labels: torch.Tensor, answers: Answers) -> torch.Tensor:
    """[B, 2] the logits of the two answers' first tokens at the prompt's last position (logits [B, L, V])."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at = logits[rows, answer_positions(labels)]  # [B, V]
    return at[:, list(answers.first)].float()


def batches(count: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def correct(model: nn.Module, data: Prompts, answers: Answers, pad: int, batch_size: int = 32) -> torch.Tensor:
    """[N] bool: whether the model answers each prompt with its class's answer (eval mode, no gradients)."""
    found = []
    with EvalMode(model), torch.inference_mode():
        for indices in batches(len(data), batch_size):
            inputs = batch(data, answers, indices, pad, adversary=False)
            choice = answer_logits(model(**inputs).logits, inputs["labels"], answers).argmax(-1)  # [B]
            found.append(choice == torch.tensor([data.classes[i] for i in indices]))
    return torch.cat(found)


def prompt_pgd(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    answers: Answers,
    radius: float,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 PGD on the prompt's input embeddings against the correct answer: (δ [B, L, H], answer after it [B]).

    .. math::
        δ_0 = 0,\\quad δ_t = Π_r\\big(δ_{t-1} + α · G_t/‖G_t‖₂\\big),\\quad
        G_t = ∇_δ \\mathrm{CE}\\big(f(x + δ), y\\big)

    :func:`advfunc.attacks.pgd` with ``target="embeds@prompt"``: y is the correct answer
    (``labels``), δ is zero outside the prompt and its norm is per example over the
    prompt's (positions, hidden), α = 2.5·r/steps (Madry et al., 2018). Cost: ``steps``
    passes that differentiate δ only and one forward.

    Raises ``FloatingPointError`` when the attack overflowed: an attack that dropped its δ
    must not be reported as one the model withstood.
    """
    attack = attacks.pgd(
        model, epsilon=radius, alpha=2.5 * radius / steps, steps=steps, target="embeds@prompt", compile=False
    )
    call = prepare(model, attack.perturbed, attack.target, params, inputs)
    with attack.perturbed.hooked(count=False):
        placed, skipped = attack.run(call)
        with torch.no_grad():
            logits = logits_of(attack.engine.outputs(call.params, call.kwargs, call.layout, placed))
    if bool(skipped) or not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            f"prompt PGD at radius {radius:g} overflowed (non-finite gradients or logits), so it cannot say "
            "whether the model is robust there; use smaller --radii"
        )
    delta = attack.target.public(placed)
    assert isinstance(delta, torch.Tensor)
    return delta, answer_logits(logits, inputs["labels"], answers).argmax(-1)


def robust_accuracy(
    model: nn.Module,
    data: Prompts,
    answers: Answers,
    pad: int,
    radii: Sequence[float],
    steps: int,
    batch_size: int = 16,
    clean: torch.Tensor | None = None,
) -> tuple[float, dict[float, float]]:
    """(clean accuracy, {radius: accuracy under prompt PGD within that radius}) on ``data``.

    ``clean``: [N] bool, :func:`correct` of ``data`` when the caller has it already.
    """
    params = params_of(model)
    alive = (correct(model, data, answers, pad, batch_size) if clean is None else clean).clone()  # [N]
    accuracy = float(alive.float().mean())
    standing: dict[float, float] = {}
    with EvalMode(model):
        for radius in sorted(radii):
            survivors = alive.nonzero().squeeze(1).tolist()
            for start in range(0, len(survivors), batch_size):
                chunk = survivors[start : start + batch_size]
                inputs = batch(data, answers, chunk, pad, adversary=False)
                _, choice = prompt_pgd(model, params, inputs, answers, radius, steps)
                alive[chunk] &= choice == torch.tensor([data.classes[i] for i in chunk])
            standing[radius] = float(alive.float().mean())
    return accuracy, standing


class DecoderVictim:
    """A causal LM as the two-class classifier the synonym attack queries: ``[N] texts -> [N, 2]``.

    Each text is put in the prompt the model was trained on; the class probabilities are
    the softmax of the two answers' first-token logits (eval mode, no gradients).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, answers: Answers, max_length: int, pad: int, batch_size: int = 32
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.answers = answers
        self.max_length = max_length
        self.pad = pad
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        data = prompts(texts, [0] * len(texts), self.tokenizer, self.answers, self.max_length)
        found = []
        with EvalMode(self.model), torch.inference_mode():
            for indices in batches(len(data), self.batch_size):
                inputs = batch(data, self.answers, indices, self.pad, adversary=False)
                logits = answer_logits(self.model(**inputs).logits, inputs["labels"], self.answers)
                found.append(torch.softmax(logits, dim=-1))
        return torch.cat(found)
