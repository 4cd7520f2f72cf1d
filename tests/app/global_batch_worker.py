"""One rank of tests/app/test_global_batches.py: ``advfunc train --batch-size 8`` under torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from advfunc.app.cli import entry_point
from tests.app.test_global_batches import train_args

if __name__ == "__main__":
    raise SystemExit(entry_point(train_args(Path(sys.argv[1]), Path(sys.argv[2]), batch_size=8)))
