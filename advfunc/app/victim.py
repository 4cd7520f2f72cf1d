"""A fine-tuned classifier and a sentence encoder as the functions the synonym attack queries.

The attack sees texts only: :class:`Victim` tokenizes them the way training did and
returns class probabilities (eval mode, no gradients), or the loss gradient at each
word's embedding outputs for the gradient word order; :class:`SentenceEncoder` embeds
texts with a mean-pooled transformer (all-MiniLM-L6-v2 was trained that way).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

import advfunc
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
        encoded = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt", **extra
        )
        if not self._takes_types:
            encoded.pop("token_type_ids", None)
        return {k: v.to(self._device) for k, v in encoded.items()}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        probabilities = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._encode(texts[start : start + self.batch_size])
                probabilities.append(torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu())
        return torch.cat(probabilities)

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
        embeddings = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(self.model.device)
                hidden = self.model(**batch).last_hidden_state  # [B, L, H]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, H]
                embeddings.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(embeddings)
