"""Files and directories written whole or not at all: under a hidden temporary name beside the
destination, then renamed into place, so a crash leaves the previous version or nothing. A process
killed outright may leave ``.NAME.{tmp,partial,old}-PID-HEX`` beside NAME, which :func:`recover`
(run by the next write of NAME) cleans up. Outputs are checked before the work that produces them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written; the message names it and says why."""


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name in ``path``'s directory: same file system, so rename is atomic."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def recover(path: Path) -> None:
    """Remove the temporary siblings of ``path`` that dead processes left, restoring a lost ``path`` from its
    ``.old``; a live writer's files and anything a user wrote (other names) are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|partial|old)-(\d+)-[0-9a-f]{{8}}$")
    found = [
        (m.group(1), int(m.group(2)), entry) for entry in path.parent.iterdir() if (m := pattern.match(entry.name))
    ]
    for kind, pid, entry in sorted(found, key=lambda item: item[0] != "old"):
        if _running(pid):
            continue
        if kind == "old" and not path.exists():
            os.rename(entry, path)  # killed between the two renames: this is the last complete version
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _probe(directory: Path, flag: str, path: Path) -> None:
    """Raise ``OutputError`` unless a file can be created in ``directory`` (or in the folder that will hold it)."""
    existing = Path(os.path.abspath(directory))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a directory; choose another {flag}")
    try:
        handle, name = tempfile.mkstemp(prefix=".advfunc-probe-", dir=existing)
    except OSError as error:
        raise OutputError(
            f"{flag} {path} cannot be written ({existing}: {error.strerror}); choose another {flag}"
        ) from None
    os.close(handle)
    os.unlink(name)


def require_replaceable(path: Path, flag: str, *, directory: bool) -> None:
    """Raise ``OutputError`` unless ``path``, a ``directory`` (a checkpoint) or a file, can be written whole and
    renamed into place."""
    path, absolute = Path(path), Path(os.path.abspath(path))
    kind = "directory" if directory else "file"
    if absolute == absolute.parent or Path.cwd().is_relative_to(absolute):
        raise OutputError(
            f"{flag} {path} is the current directory or one above it, which cannot be replaced as a whole; "
            f"name a new {kind}"
        )
    if path.exists() and path.is_dir() != directory:
        raise OutputError(f"{flag} {path} is a {'directory' if path.is_dir() else 'file'}; give a {kind} path")
    _probe(absolute.parent, flag, path)


def require_writable_folder(path: Path, flag: str) -> None:
    """Raise ``OutputError`` unless files can be written inside the folder ``path`` (made if missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a directory path")
    _probe(path, flag, path)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as UTF-8."""
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_with(path: Path, writer: Callable[[Path], object]) -> None:
    """Call ``writer(tmp)`` to produce the file at a temporary name, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = temporary_sibling(path)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block ends without error: the old one is moved
    aside, the new one renamed in, then the old one removed (on error ``path`` is left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp, old = temporary_sibling(path, "partial"), None
    tmp.mkdir()
    try:
        yield tmp
        old = temporary_sibling(path, "old") if path.exists() else None
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
