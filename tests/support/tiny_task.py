"""A tiny learnable sentiment task on disk: a random BERT with its WordPiece tokenizer, and data files.

The label is decided by the sentiment words in the text, so a few epochs of training
on a few dozen rows give a model well above chance, which the attacks can then break.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely", "fun", "moving"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "flat", "messy"]
FILLER = ["the", "movie", "film", "plot", "was", "is", "a", "story", "acting", "very", "quite", "and", "it", "cast"]
PIECES = ["##s", "##ly", "##est"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER + PIECES


def save_tiny_model(directory: Path, seed: int = 0, num_labels: int = 2) -> Path:
    """A random 1-layer BERT (hidden 32, dropout 0) and its tokenizer, as ``save_pretrained`` writes them.

    The wide initialisation (0.1, not BERT's 0.02) lets it leave the loss plateau of a
    tiny random transformer within ~40 steps, which keeps the tests short.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        initializer_range=0.1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        pad_token_id=0,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def sentences(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) rows: 3–8 filler words and one or two sentiment words of the label's side."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, rng.randint(3, 8))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], columns: tuple[str, str] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    return path


def fitted(model: torch.nn.Module, tokenizer: object, rows: list[tuple[str, str]], steps: int = 40) -> torch.nn.Module:
    """``model`` fitted in place to ``rows`` (labels "neg" 0, "pos" 1) by full-batch AdamW, then put in eval mode:
    a classifier right on them, whose decisions hang on the sentiment words, for the word attacks to break."""
    batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")  # type: ignore[operator]
    labels = torch.tensor([int(label == "pos") for _, label in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()
