"""Free adversarial training's batch order under Trainer: each batch several times in a row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ReplaySampler(Sampler[int]):
    """An index order in which each process gets each of its batches ``replays`` times in a row.

    The wrapped sampler's order is cut into groups of ``batch_size · processes`` indices
    (one batch per process, as accelerate deals consecutive batches out to processes) and
    each group is repeated ``replays`` times. An incomplete last group is filled from the
    start of the order (as accelerate's ``even_batches`` does), or dropped with
    ``drop_last``: a short batch repeated would straddle the batch boundaries. Epoch
    setting and the shuffling generator reach the wrapped sampler.
    """

    def __init__(self, inner: Any, batch_size: int, processes: int, replays: int, *, drop_last: bool = False) -> None:
        self.inner = inner
        self.group = batch_size * processes
        self.replays = replays
        self.drop_last = drop_last

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.inner, "generator", None)

    @generator.setter
    def generator(self, value: torch.Generator | None) -> None:
        self.inner.generator = value

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def _groups(self, count: int) -> int:
        return count // self.group if self.drop_last else -(-count // self.group)

    def __len__(self) -> int:
        return self._groups(len(self.inner)) * self.group * self.replays

    def __iter__(self) -> Iterator[int]:
        order = list(self.inner)
        groups = self._groups(len(order))
        while order and len(order) < groups * self.group:
            order += order[: groups * self.group - len(order)]
        for g in range(groups):
            chunk = order[g * self.group : (g + 1) * self.group]
            for _ in range(self.replays):
                yield from chunk
