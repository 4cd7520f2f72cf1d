"""A fine-tuned classifier and a sentence encoder as the functions the synonym attack queries.

The attack sees texts only: :class:`Victim` tokenizes them the way training did and
returns class probabilities (eval mode, no gradients), or the loss gradient at each
word's embedding outputs for the gradient word order; :class:`SentenceEncoder` embeds
texts with a mean-pooled transformer (all-MiniLM-L6-v2 was trained that way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from advfunc.core.model import accepted_keywords, mean_pool
from advfunc.core.params import params_of
from advfunc.core.perturbed_loss import perturbed_loss
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
        self._loss_at = perturbed_loss(model, target="embeds")
        self._device = next(model.parameters()).device
        self._takes_types = "token_type_ids" in accepted_keywords(model)

    def inputs(self, texts: Sequence[str], **extra: Any) -> dict[str, torch.Tensor]:
        """``texts`` as the model's keyword arguments on its device, tokenized as in training, padded."""
        encoded = _tokenize(self.tokenizer, texts, self.max_length, **extra)
        if not self._takes_types:
            encoded.pop("token_type_ids", None)
        return {k: v.to(self._device) for k, v in encoded.items()}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        def probabilities(chunk: Sequence[str]) -> torch.Tensor:
            return torch.softmax(self.model(**self.inputs(chunk)).logits.float(), dim=-1)

        return _batched(probabilities, texts, self.batch_size)

    def seen_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """[N] the token ids the model reads of each text: special tokens included, cut at ``max_length``."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def gradient_importance(self, text: str, spans: Sequence[tuple[int, int]], label: int) -> torch.Tensor:
        """[W] ‖∂L/∂e‖₂ summed over each word's tokens, e the embedding output [1, L, H]."""
        batch = self.inputs([text], return_offsets_mapping=True)
        offsets = batch.pop("offset_mapping")[0].tolist()  # [L] (start, end) characters of each token
        batch["labels"] = torch.tensor([label], device=self._device)
        params = params_of(self.model)
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
