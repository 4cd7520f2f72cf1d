"""Progress of long loops: a tqdm bar on a terminal, a few plain log lines in a log file.

A bar redrawn with carriage returns turns a ``nohup`` log into one unreadable line, so
when stderr is not a terminal the bar is off and a line is logged every ~10% instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("advfunc")


class Progress(contextlib.AbstractContextManager["Progress"]):
    """Counts steps of a loop and shows the metrics and steps per second; a context manager, ``update(loss=...)``
    once per step."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self.total, self.desc, self.done = total, desc, initial
        self.started, self.counted = time.perf_counter(), 0  # steps of this process: an honest rate after a resume
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
        elapsed = time.perf_counter() - self.started
        shown = {k: f"{v:.4f}" for k, v in metrics.items()}
        shown["steps/s"] = f"{self.counted / elapsed if elapsed > 0 else 0.0:.2f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        if self.log_lines and (self.done >= self.next_log or self.done == self.total):
            log.info("%s %d/%d %s", self.desc, self.done, self.total, " ".join(f"{k}={v}" for k, v in shown.items()))
            self.next_log = self._next_mark(self.done)

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
