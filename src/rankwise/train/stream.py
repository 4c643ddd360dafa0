"""An endless, resumable stream of training examples: a fresh seeded permutation each epoch."""
from __future__ import annotations

import torch


class ExampleStream:
    """Yields indices into a dataset of `size` items; (epoch, position) is the whole state."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError("the checkpoint was taken on different training data or seed; cannot resume exactly")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()
