"""The checkpoints that :mod:`advfunc.app.classify.train` writes: a ``save_pretrained``
directory plus the Trainer's and the method's state and ``advfunc_state.json`` (step, settings, losses, the files
it holds), renamed into place whole. Models are read by :mod:`advfunc.hf.loading`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "advfunc_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, or made with other settings)."""


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
