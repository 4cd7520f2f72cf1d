"""A sequence classifier whose head reads the mean of the encoder's token states.

For sentence encoders trained with mean pooling (all-MiniLM-L6-v2), whose ``[CLS]``
pooler output was never trained (why it matters, measured: ``docs/main_job.md``):

.. math::
    \\text{logits} = W\\,\\frac{\\sum_t m_t h_t}{\\sum_t m_t} + b

with ``h`` the last hidden states ``[B, L, H]`` and ``m`` the attention mask ``[B, L]``, so
padding never changes a prediction. Saved as model type ``advfunc-mean-pooled``, which
importing this module registers with transformers' Auto classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from advfunc.core.model import mean_pool

MODEL_TYPE = "advfunc-mean-pooled"


class MeanPooledConfig(PretrainedConfig):
    """The encoder's own config (``encoder``, a dict) plus the classification head's labels."""

    model_type = MODEL_TYPE
    has_no_defaults_at_init = True

    def __init__(self, encoder: dict[str, Any] | None = None, classifier_dropout: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = dict(encoder or {})
        self.classifier_dropout = classifier_dropout

    @property
    def hidden_size(self) -> int:
        return int(self.encoder["hidden_size"])


class MeanPooledForSequenceClassification(PreTrainedModel):
    """An encoder (any ``AutoModel``) and a linear head on its mask-weighted mean token state."""

    config_class = MeanPooledConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MeanPooledConfig) -> None:
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels or 2)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # A zero head: the encoder's first gradients W^T (p - y) are zero, not a random direction (Kumar et al., 2022).
        if module is self.classifier:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **encoder_inputs: Any,
    ) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **encoder_inputs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))  # [B, C]
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def from_encoder(folder: str | Path, **config: Any) -> MeanPooledForSequenceClassification:
    """A fresh head on the pretrained encoder saved in ``folder`` (its pooler, if any, left out).

    ``config``: the head's settings (``num_labels``, ``id2label``, ``label2id``).
    """
    encoder = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    model = MeanPooledForSequenceClassification(MeanPooledConfig(encoder=encoder.config.to_dict(), **config))
    model.encoder.load_state_dict(encoder.state_dict())
    return model


AutoConfig.register(MODEL_TYPE, MeanPooledConfig)
AutoModelForSequenceClassification.register(MeanPooledConfig, MeanPooledForSequenceClassification)
