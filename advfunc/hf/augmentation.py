"""A2T's adversarial examples inside a training loop: made per batch, their weighted loss's gradient, the cost.

For a batch of B examples (token ids, as a ``Trainer`` gives them) :class:`A2TAugmenter`
decodes the texts the model reads, lets :func:`advfunc.words.augment.a2t_examples` attack
``ratio`` of them against the current parameters, and returns the gradient of

.. math::
    \\frac{α}{B} \\sum_{j \\in S} ℓ(x'_j, y_j)

over the set S of adversarial examples that flipped the prediction (one forward and
backward over them, the model's own loss), to be added to the batch's step: the batch
then trains on ``L_step + α/B Σ_S ℓ``, A2T's ``L_clean + α L_adv`` (Yoo & Qi, Findings of
EMNLP 2021; the weighting is :mod:`advfunc.words.augment`'s).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc.core.step import Grads, Step
from advfunc.methods.plain import plain
from advfunc.words.augment import A2TConfig, AugmentationCost, a2t_examples
from advfunc.words.synonym_attack import Encode
from advfunc.words.victim import Victim
from advfunc.words.wordnet import WordNet

_NO_LIMIT = 1_000_000  # transformers' model_max_length when a tokenizer sets none is far above this


class A2TAugmenter:
    """A2T's per-batch adversarial examples for a classifier trained on token-id batches.

    ``tokenizer`` decodes each batch's ``input_ids`` (special tokens and padding left out)
    to the text the model reads and tokenizes the adversarial texts back; ``encode`` embeds
    texts for the similarity bound (None only with ``attack.similarity=-1``); ``wordnet``
    gives the candidates (None: WordNet read once here). The examples to attack are drawn
    from :attr:`generator`, seeded with ``seed``; :attr:`cost` sums every batch's.
    Single texts only: a batch of text pairs (``token_type_ids`` not all 0, or a row with two separator
    tokens) is refused; a tokenizer with neither marks no pairs.
    """

    def __init__(
        self, config: A2TConfig, tokenizer: Any, *, seed: int, encode: Encode | None = None,
        wordnet: WordNet | None = None,
    ) -> None:  # fmt: skip
        config.check()
        if tokenizer is None:
            raise ValueError("A2T needs the tokenizer to read the batches' texts: pass processing_class=tokenizer")
        if encode is None and config.attack.similarity > -1:
            raise ValueError(
                f"A2T's similarity bound ({config.attack.similarity:g}) needs a sentence encoder: pass "
                "sentence_encoder=advfunc.words.victim.SentenceEncoder(folder), or set the attack's similarity=-1"
            )
        self.config, self.tokenizer = config, tokenizer
        self.encode: Encode = encode if encode is not None else _never_called
        self.wordnet = wordnet if wordnet is not None else WordNet()
        self.generator = torch.Generator().manual_seed(seed)
        self.cost = AugmentationCost()
        self._model: nn.Module | None = None
        self._victim: Victim | None = None
        self._plain: Step | None = None

    def _bound(self, model: nn.Module) -> tuple[Victim, Step]:
        if self._model is not model or self._victim is None or self._plain is None:
            # The decoded texts are what the model read; an adversarial one may be a few tokens longer.
            limit: Any = getattr(self.tokenizer, "model_max_length", None)
            if not isinstance(limit, int) or limit >= _NO_LIMIT:
                limit = getattr(getattr(model, "config", None), "max_position_embeddings", 512)
            self._model, self._victim, self._plain = model, Victim(model, self.tokenizer, int(limit)), plain(model)
        return self._victim, self._plain

    def texts(self, batch: Mapping[str, Any]) -> list[str]:
        """[B] the texts of ``batch``'s ``input_ids`` as the model reads them: no special tokens, no padding."""
        types = batch.get("token_type_ids")
        if isinstance(types, torch.Tensor) and bool(types.any()):
            raise ValueError(
                "A2T attacks single texts, but this batch holds text pairs (token_type_ids not all 0); "
                "train pairs without A2T"
            )
        rows = batch["input_ids"].tolist()
        mask = batch["attention_mask"].tolist() if "attention_mask" in batch else [[1] * len(r) for r in rows]
        separator = getattr(self.tokenizer, "sep_token_id", None)
        if separator is not None and any(
            sum(t == separator and keep for t, keep in zip(row, kept, strict=True)) > 1
            for row, kept in zip(rows, mask, strict=True)
        ):  # RoBERTa-style pairs carry no token_type_ids: a second separator gives them away
            raise ValueError(
                "A2T attacks single texts, but a row holds two separators (a text pair); train pairs without A2T"
            )
        return [
            self.tokenizer.decode([t for t, keep in zip(row, kept, strict=True) if keep], skip_special_tokens=True)
            for row, kept in zip(rows, mask, strict=True)
        ]

    def grads(
        self, model: nn.Module, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
    ) -> tuple[Grads, torch.Tensor] | None:
        """(∇θ of α/B Σ_S ℓ, that loss term []) for ``batch``'s adversarial examples S; None when none flipped.

        ``model`` is the module ``params`` belong to (in eval mode for the attack, its modes
        restored); the loss is the model's own (``outputs.loss``), as in plain fine-tuning.
        """
        if batch["labels"].dim() != 1:
            raise ValueError(
                f"A2T attacks a sequence classifier, whose labels are [B] class ids; these are "
                f"{list(batch['labels'].shape)} (a language model's token labels?): train this model without A2T"
            )
        victim, step = self._bound(model)
        texts, labels = self.texts(batch), batch["labels"].tolist()
        found = a2t_examples(
            victim, texts, labels, self.config, self.generator, wordnet=self.wordnet, encode=self.encode
        )
        self.cost += found.cost
        if not found.texts:
            return None
        device = batch["labels"].device
        adversarial = {**victim.inputs(found.texts), "labels": torch.tensor(found.labels, device=device)}
        scale = self.config.weight * len(found.texts) / len(texts)
        grads, out = step(params, adversarial, loss_scale=scale)
        return grads, out.loss * scale


def _never_called(texts: Any) -> torch.Tensor:
    raise AssertionError("the attack asked for sentence embeddings with similarity=-1")
