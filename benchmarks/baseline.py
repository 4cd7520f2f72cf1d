"""Another revision of advfunc, importable beside this checkout, so that both are timed in one process.

Timings on a shared CPU drift by tens of percent between processes; only cases interleaved
round by round in one process compare. ``import_revision("85df5bc")`` extracts that
revision's ``advfunc/`` package with ``git archive`` into a temporary folder as the package
``advfunc_85df5bc`` (every ``advfunc`` word in its sources renamed, so that it imports itself,
not this checkout) and imports it.
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
_PACKAGE_WORD = re.compile(r"\badvfunc\b")


def import_revision(revision: str, repository: Path = ROOT) -> ModuleType:
    """Import ``revision``'s advfunc package (a commit, tag or branch of ``repository``) under a new name."""
    name = "advfunc_" + re.sub(r"\W", "_", revision)
    if name in sys.modules:
        return sys.modules[name]
    listing = subprocess.run(
        ["git", "-C", str(repository), "archive", "--format=tar", revision, "advfunc"],
        capture_output=True,
        check=False,
    )
    if listing.returncode != 0:
        message = listing.stderr.decode(errors="replace").strip()
        raise ValueError(f"cannot export advfunc/ at revision {revision!r} of {repository}: {message}")
    folder = Path(tempfile.mkdtemp(prefix="advfunc-baseline-"))
    with tarfile.open(fileobj=io.BytesIO(listing.stdout)) as archive:
        archive.extractall(folder, filter="data")
    package = (folder / "advfunc").rename(folder / name)
    for source in package.rglob("*.py"):
        source.write_text(_PACKAGE_WORD.sub(name, source.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)
