"""Run a script under ``torch.distributed.run`` from a test, bounded in time.

torchrun starts in a session of its own, so that a timeout ends it and every rank it
started by process group, never leaving ranks behind to hold the test machine's cores.

Every rank runs with Python's fault handler on, so a rank that dies by a signal prints
the Python stack of each of its threads. A rank killed by a signal (other than the
SIGTERM torchrun sends the survivors) is a crash inside the C++ runtime, not a failed
check: gloo on CPU has aborted that way ("terminate called without an active
exception") on a loaded two-core machine, before any step ran. Such a run is started
again once, with the first log shown as a warning; a Python error or an exit code from
a rank fails at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK_EXIT_CODE = re.compile(r"exitcode\s*:\s*(-?\d+)")


def died_by_signal(log: str) -> bool:
    """Whether torchrun's failure report names a rank ended by a signal it did not send itself."""
    return any(int(code) < 0 and -int(code) != signal.SIGTERM for code in RANK_EXIT_CODE.findall(log))


def run_torchrun(script: Path, *args: str, processes: int, timeout_s: float) -> str:
    """Run ``script args`` on ``processes`` local ranks; return the combined output, failing the test on error."""
    for attempt in (1, 2):
        returncode, log = _run_once(script, args, processes, timeout_s)
        if returncode == 0:
            return log
        if attempt == 1 and died_by_signal(log):
            message = f"torchrun {script.name}: a rank died by a signal; running it again. First log:\n{log[-6000:]}"
            warnings.warn(message, stacklevel=2)
            continue
        break
    raise AssertionError(log[-6000:])


def _run_once(script: Path, args: tuple[str, ...], processes: int, timeout_s: float) -> tuple[int, str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen(
        [*command, str(script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log = proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"torchrun {script.name} did not finish in {timeout_s} s")
    return proc.returncode, log
