"""Wall-clock time per named phase, summed over layers and chunks (reported as `phase_seconds`)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.device = device

    def _sync(self) -> None:
        # GPU kernels run asynchronously: without a sync the time would land in whichever phase waits next.
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 6) for name, value in self.seconds.items()}
