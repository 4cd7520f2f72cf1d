"""A fine-tuned classifier and a sentence encoder as the functions the synonym attack queries.

The attack sees texts only: :class:`Victim` tokenizes them the way training did and
returns class probabilities (eval mode, no gradients), or the loss gradient at each
word's embedding outputs for the gradient word order; :class:`SentenceEncoder` embeds
texts with a mean-pooled transformer (all-MiniLM-L6-v2 was trained that way).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

import advfunc
from advfunc.app.common.checkpoint import default_model_dir
from advfunc.app.common.flags import add_fields, build
from advfunc.app.common.mean_pooled import mean_pool
from advfunc.app.common.progress import Progress
from advfunc.app.word_attacks.synonym_attack import (
    AttackSummary,
    Classify,
    GradientImportance,
    SynonymAttackConfig,
    attack_text,
)
from advfunc.app.word_attacks.wordnet import WordNet
from advfunc.core.model import accepted_keywords
from advfunc.core.targets import EmbeddingOutput, input_embedding


class Victim:
    """``model`` + ``tokenizer`` as ``classify(texts) -> [N, C]`` probabilities.

    Put the model in eval mode first (an attack is aimed at the deployed network).
    ``batch_size`` texts are classified per forward.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self._loss_at = advfunc.perturbed_loss(model, target="embeds")
        self._device = next(model.parameters()).device
        self._takes_types = "token_type_ids" in accepted_keywords(model)

    def _encode(self, texts: Sequence[str], **extra: Any) -> dict[str, torch.Tensor]:
        encoded = _tokenize(self.tokenizer, texts, self.max_length, **extra)
        if not self._takes_types:
            encoded.pop("token_type_ids", None)
        return {k: v.to(self._device) for k, v in encoded.items()}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        def probabilities(chunk: Sequence[str]) -> torch.Tensor:
            return torch.softmax(self.model(**self._encode(chunk)).logits.float(), dim=-1)

        return _batched(probabilities, texts, self.batch_size)

    def gradient_importance(self, text: str, spans: Sequence[tuple[int, int]], label: int) -> torch.Tensor:
        """[W] ‖∂L/∂e‖₂ summed over each word's tokens, e the embedding output [1, L, H]."""
        batch = self._encode([text], return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping")[0].tolist()  # [L] (start, end) characters of each token
        batch["labels"] = torch.tensor([label], device=self._device)
        params = advfunc.params_of(self.model)
        width = EmbeddingOutput(input_embedding(self.model)).hidden
        zero = torch.zeros((1, batch["input_ids"].shape[1], width), device=self._device)
        gradient = torch.func.grad(lambda delta: self._loss_at(params, batch, delta))(zero)[0]  # [L, H]
        saliency = gradient.norm(dim=-1).cpu()  # [L]
        scores = torch.zeros(len(spans))
        for token, (start, end) in enumerate(offsets):
            if end <= start:  # special tokens and padding
                continue
            for w, (w_start, w_end) in enumerate(spans):
                if start < w_end and end > w_start:
                    scores[w] += saliency[token]
        return scores


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings of a transformer encoder: ``[N] texts -> [N, D]``."""

    def __init__(
        self, folder: str | Path, max_length: int = 128, batch_size: int = 64, device: torch.device | str = "cpu"
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval().to(device)
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        def embed(chunk: Sequence[str]) -> torch.Tensor:
            batch = _tokenize(self.tokenizer, chunk, self.max_length).to(self.model.device)
            pooled = mean_pool(self.model(**batch).last_hidden_state, batch["attention_mask"])  # [B, H]
            return torch.nn.functional.normalize(pooled, dim=-1)

        return _batched(embed, texts, self.batch_size)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, **extra: Any) -> Any:
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt", **extra)


def _batched(apply: Callable[[Sequence[str]], torch.Tensor], texts: Sequence[str], size: int) -> torch.Tensor:
    """``apply`` to ``texts`` in chunks of ``size`` under inference mode, the rows concatenated on the CPU."""
    with torch.inference_mode():
        return torch.cat([apply(texts[start : start + size]).cpu() for start in range(0, len(texts), size)])


@functools.cache
def shared_wordnet() -> WordNet:
    return WordNet()  # a few seconds to parse: once per process


@functools.cache
def shared_sentence_encoder(folder: str, max_length: int, device: torch.device | str = "cpu") -> SentenceEncoder:
    return SentenceEncoder(folder, max_length, device=device)


def synonym_attack(
    classify: Classify,
    texts: Sequence[str],
    labels: Sequence[int],
    config: SynonymAttackConfig,
    encoder: str | Path | None,
    max_length: int,
    importance: GradientImportance | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[AttackSummary, list[bool]]:
    """The synonym-substitution attack on each (text, label): (summary, [N] whether each example survived).

    An example survives when it was classified correctly and the attack failed to flip it.
    The similarity constraint embeds texts with ``encoder`` (a folder; all-MiniLM-L6-v2,
    mean-pooled, when None) on ``device``.
    """
    config.check()
    folder = encoder if encoder is not None else default_model_dir()
    encode = shared_sentence_encoder(str(folder), max_length, device)
    results = []
    with Progress(len(texts), "attack synonyms", progress) as bar:
        for text, label in zip(texts, labels, strict=True):
            results.append(attack_text(text, int(label), classify, encode, shared_wordnet(), config, importance))
            bar.update()
    return AttackSummary.of(results), [result.status == "failed" for result in results]


# The flags of SynonymAttackConfig's fields that had names before the flags were generated; a new field
# becomes --synonym-<field>.
SYNONYM_FLAGS = {
    "max_candidates": "synonym-candidates",
    "max_change": "synonym-change",
    "query_budget": "synonym-queries",
    "similarity": "similarity",
    "order": "word-order",
}


def add_synonym_flags(group: Any, defaults: dict[str, Any] | None = None) -> None:
    """``--no-synonym`` and a flag for each field of :class:`SynonymAttackConfig`."""
    group.add_argument("--no-synonym", action="store_true", help="skip the WordNet synonym-substitution attack")
    add_fields(group, SynonymAttackConfig, prefix="synonym_", names=SYNONYM_FLAGS, defaults=defaults)


def synonym_config(args: Any) -> SynonymAttackConfig | None:
    """The synonym attack's settings from the flags (checked), or None under ``--no-synonym``."""
    if args.no_synonym:
        return None
    config: SynonymAttackConfig = build(SynonymAttackConfig, args, prefix="synonym_")
    config.check()
    return config


def describe_synonym_attack(config: SynonymAttackConfig) -> str:
    """The attack and its constraints in a phrase, for a report."""
    return (
        f"WordNet synonym substitution ({config.order} word order, at most {config.max_change:.0%} of the words, "
        f"{config.max_candidates} synonyms per word, {config.query_budget} queries, sentence cosine >= "
        f"{config.similarity:g})"
    )
