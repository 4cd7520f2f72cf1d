"""Files and directories written whole or not at all.

Every output of the CLI (checkpoints, results, plots) is first written under a hidden
temporary name next to its destination and then renamed into place: a crash, a full
disk or Ctrl-C leaves either the previous version or nothing, never a half-written file
that a later run would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name in ``path``'s directory: same file system, so rename is atomic."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_with(path: Path, writer: Callable[[Path], object]) -> None:
    """Call ``writer(tmp)`` to produce the file at a temporary name, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block ends without error.

    An existing ``path`` is moved aside, the new one renamed in, and only then the old one
    removed, so a complete directory exists at every moment except between two renames.
    On error the temporary directory is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, "partial")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = temporary_sibling(path, "old") if path.exists() else None
    try:
        if old is not None:
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
