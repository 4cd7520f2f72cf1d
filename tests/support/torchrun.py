"""Run a script under ``torch.distributed.run`` from a test, bounded in time.

torchrun starts in a session of its own, so that a timeout ends it and every rank it
started by process group, never leaving ranks behind to hold the test machine's cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_torchrun(script: Path, *args: str, processes: int, timeout_s: float) -> str:
    """Run ``script args`` on ``processes`` local ranks; return the combined output, failing the test on error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
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
    assert proc.returncode == 0, log[-6000:]
    return log
