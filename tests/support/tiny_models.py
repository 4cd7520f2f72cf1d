"""Tiny random Hugging Face sequence classifiers of several families, dropout off."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 120
FAMILIES = ("bert", "roberta", "distilbert", "gpt2")
# The attribute the classic FGM/PGD classes match in parameter names, per family.
EMBEDDING_NAME = {
    "bert": "word_embeddings",
    "roberta": "word_embeddings",
    "distilbert": "word_embeddings",
    "gpt2": "wte",
}
PAD_ID = {"bert": 0, "roberta": 1, "distilbert": 0, "gpt2": 0}


def tiny_model(family: str, seed: int = 0, num_labels: int = 3, vocab: int = VOCAB) -> PreTrainedModel:
    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=num_labels,
            pad_token_id=0,
        )
        model = BertForSequenceClassification(config)
    elif family == "roberta":
        config = RobertaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=72,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=num_labels,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        model = RobertaForSequenceClassification(config)
    elif family == "distilbert":
        config = DistilBertConfig(
            vocab_size=vocab,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            num_labels=num_labels,
            pad_token_id=0,
        )
        model = DistilBertForSequenceClassification(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            num_labels=num_labels,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=2,
        )
        model = GPT2ForSequenceClassification(config)
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    model.train()  # dropout is 0, so train mode is deterministic and the realistic mode
    return model


def padded_batch(
    family: str, batch: int = 4, length: int = 12, seed: int = 0, num_labels: int = 3, vocab: int = VOCAB
) -> dict[str, torch.Tensor]:
    """Right-padded batch with lengths from 3 to ``length``; real tokens never equal the pad id."""
    g = torch.Generator().manual_seed(seed)
    pad = PAD_ID[family]
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    labels = torch.randint(0, num_labels, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
