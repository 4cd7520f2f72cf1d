"""One rank of tests/test_cli_distributed.py: ``advfunc train`` under ``torchrun --nproc_per_node 2``.

``torchrun --nproc_per_node 2 tests/cli_distributed_worker.py TASK OUT`` runs the command
three times in one launch (starting the processes costs more than the tiny runs): the
whole run into ``OUT/whole``, the same run stopped at step 4 (mid second epoch) into
``OUT/part``, and ``OUT/part`` resumed to the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advfunc.app.cli import main

METHOD = "freelb:init_mag=0.1,steps=2"  # draws noise: each process's generator must come back on resume


def command(task: Path, output: Path, *extra: str) -> list[str]:
    args = [
        "--threads",
        "1",
        "--no-progress",
        "train",
        "--model",
        str(task / "model"),
        "--data",
        str(task / "train.csv"),
    ]
    return [
        *args,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--method",
        METHOD,
        "--output",
        str(output),
        *extra,
    ]


if __name__ == "__main__":
    task, out = Path(sys.argv[1]), Path(sys.argv[2])
    for argv in (
        command(task, out / "whole"),
        command(task, out / "part", "--stop-after", "4"),
        command(task, out / "part", "--resume"),
    ):
        code = main(argv)
        if code:
            raise SystemExit(code)
