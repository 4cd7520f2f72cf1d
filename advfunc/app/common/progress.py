"""Progress of long loops: a tqdm bar on a terminal, a few plain log lines in a log file.

A bar redrawn with carriage returns turns a ``nohup`` log into one unreadable line, so
when stderr is not a terminal the bar is off and a line is logged every ~10% instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("advfunc")


class Progress:
    """Counts steps of a loop; shows loss and steps per second.

    Use as a context manager; call ``update(loss=...)`` once per step.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self.total = total
        self.desc = desc
        self.done = initial
        self.started = time.perf_counter()
        self.counted = 0  # steps run in this process, for an honest rate after a resume
        interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not interactive, dynamic_ncols=True)
        self.log_lines = enabled and not interactive
        self.next_log = self._next_mark(initial)

    def _next_mark(self, done: int) -> int:
        tenth = max(1, self.total // 10)
        return (done // tenth + 1) * tenth

    def update(self, **metrics: float) -> None:
        self.done += 1
        self.counted += 1
        shown: dict[str, Any] = {k: f"{v:.4f}" for k, v in metrics.items()}
        elapsed = time.perf_counter() - self.started
        shown["steps/s"] = f"{self.counted / elapsed if elapsed > 0 else 0.0:.2f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        if self.log_lines and (self.done >= self.next_log or self.done == self.total):
            values = " ".join(f"{k}={v}" for k, v in shown.items())
            log.info("%s %d/%d %s", self.desc, self.done, self.total, values)
            self.next_log = self._next_mark(self.done)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
