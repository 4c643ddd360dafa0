"""FLOPs actually executed, counted by torch.utils.flop_counter (matmuls, attention, convolutions)."""
from __future__ import annotations

import contextlib

from torch.utils.flop_counter import FlopCounterMode


class FlopMeter:
    """Counts FLOPs of the code run inside `measure()`; `enabled=False` makes it free and report 0."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.last = 0

    @contextlib.contextmanager
    def measure(self):
        if not self.enabled:
            self.last = 0
            yield self
            return
        counter = FlopCounterMode(display=False)
        with counter:
            yield self
        self.last = counter.get_total_flops()
