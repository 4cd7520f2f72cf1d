"""One rank of tests/test_cli_distributed.py: the ``advfunc`` command under ``torchrun --nproc_per_node 2``.

``torchrun --nproc_per_node 2 tests/cli_distributed_worker.py TASK OUT`` runs the command
four times in one launch (starting the processes costs more than the tiny runs): the
whole run into ``OUT/whole``, the same run stopped at step 4 (mid second epoch) into
``OUT/part``, ``OUT/part`` resumed to the end, and a comparison of two methods into
``OUT/report``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advfunc.app.cli import entry_point, main

METHOD = "freelb:init_mag=0.1,steps=2"  # draws noise: each process's generator must come back on resume


def command(task: Path, what: str, *flags: str) -> list[str]:
    return ["--threads", "1", "--no-progress", what, "--model", str(task / "model"), *flags]


if __name__ == "__main__":
    task, out = Path(sys.argv[1]), Path(sys.argv[2])
    run = ["--data", str(task / "train.csv"), "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--method", METHOD]
    compare = ["--data", str(task / "train.csv"), "--eval-data", str(task / "test.csv"), "--batch-size", "8"]
    compare += ["--methods", "none", "fgm:epsilon=0.05", "--seeds", "0", "--radii", "0.1", "--attack-examples", "4"]
    compare += ["--hotflip-budget", "1", "--no-synonym", "--output", str(out / "report")]
    swept = ["--data", str(task / "train.csv"), "--batch-size", "8", "--methods", "none", "--seeds", "0"]
    swept += ["--radii", "0.1", "--attack-examples", "4", "--hotflip-budget", "0", "--no-synonym"]
    swept += ["--sweep", "fgm:epsilon=0.05", "fgm:epsilon=0.5", "--output", str(out / "swept")]
    for argv in (
        command(task, "train", *run, "--output", str(out / "whole")),
        command(task, "train", *run, "--output", str(out / "part"), "--stop-after", "4"),
        command(task, "train", *run, "--output", str(out / "part"), "--resume"),
        command(task, "compare", *compare),
        # a sweep: the reporting process names the winner to the other, which holds no result of its own
        command(task, "compare", *swept),
    ):
        code = main(argv)
        if code:
            raise SystemExit(code)
    raise SystemExit(entry_point(["methods"]))  # the last command ends the process group, as the console script does
