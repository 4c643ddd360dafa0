"""FLOPs actually executed, counted by torch.utils.flop_counter (matmuls, attention, convolutions) — but
only until they can be predicted, because counting runs Python for every op (4x a step on a GPU).

A measured block names what it runs (`key`: "train" for a micro-batch's forward and backward, "update"
for clipping and the optimizer step, "tiny" for Fast Forward's evaluation) and, where its FLOPs depend
on the data, its `size`: the features they are linear in, summed over its batches (see `flop_size`):

    FLOPs = c1·Σ B·T + c2·Σ B·T² + c3·Σ labelled tokens + c4·passes

(linear layers, attention scores, the LM head on labelled positions only, per-pass work such as DoRA's
weight norm). Per key, a size seen before reuses its exact count; once counts at 4 sizes that span the
features give a solve, the fifth new size is still counted and must match it; from then on new sizes are
predicted. A block without a size (the optimizer step, which does not depend on the data) is predicted
once its counts repeat with period 1 or 2 (LoFT alternates its factors), and is still counted every
`RECHECK`-th time (cheap: a few foreach ops for AdamW). Any mismatch turns prediction off for that key:
it is counted every time from then on.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from rankwise.data import IGNORE

N_FEATURES = 4
RECHECK = 50  # a size-less block's prediction is counted anyway this often
HISTORY = 8


def flop_size(batches) -> tuple[int, ...]:
    """The features a forward (and backward) over `batches` is linear in: (Σ B·T, Σ B·T², Σ labelled, passes)."""
    bt = btt = labelled = 0
    for b in batches:
        rows, width = b["input_ids"].shape
        bt += rows * width
        btt += rows * width * width
        labelled += b["n_labelled"] if "n_labelled" in b else int((b["labels"][:, 1:] != IGNORE).sum())
    return bt, btt, labelled, len(batches)


@dataclass
class _Key:
    """What one key has counted, and whether it can be predicted."""

    by_size: dict = field(default_factory=dict)  # size -> exact count
    history: list = field(default_factory=list)  # the latest counts of a size-less block, in order
    coef: torch.Tensor | None = None
    confirmed: bool = False  # a size the fit had not seen was counted and matched it
    counted_only: bool = False  # a prediction was wrong once: count every time from then on
    calls: int = 0

    def predict(self, size) -> int | None:
        self.calls += 1
        if self.counted_only:
            return None
        if size is None:
            return None if self.calls % RECHECK == 0 else self._periodic()
        if size in self.by_size:
            return self.by_size[size]
        if self.coef is not None and self.confirmed:
            return _apply(self.coef, size)
        return None

    def _periodic(self) -> int | None:
        """The next value of the history if its last 2p+1 values repeat with period p (1 or 2)."""
        h = self.history
        for p in (1, 2):
            if len(h) >= 2 * p + 1 and all(h[-i] == h[-i - p] for i in range(1, p + 2)):
                return h[-p]
        return None

    def remember(self, count: int) -> None:
        self.history = (self.history + [count])[-HISTORY:]

    def record(self, size, count: int) -> None:
        """A counted value; checks it against what would have been predicted, where anything would."""
        if size is None:
            expected = self._periodic()
            if expected is not None and expected != count:
                self.counted_only = True
            self.remember(count)
            return
        if self.coef is not None:
            if _apply(self.coef, size) != count:
                self.coef, self.counted_only = None, True
                return
            self.confirmed = True
        self.by_size[size] = count
        if self.coef is None and not self.counted_only and len(self.by_size) >= N_FEATURES:
            self.coef = _fit(self.by_size)


def _fit(samples: dict) -> torch.Tensor | None:
    """Least-squares coefficients through every sample, or None if they do not pin the model down or miss."""
    X = torch.tensor([list(s) for s in samples], dtype=torch.float64)
    y = torch.tensor(list(samples.values()), dtype=torch.float64)
    if torch.linalg.matrix_rank(X) < X.shape[1]:
        return None
    coef = torch.linalg.lstsq(X, y[:, None], driver="gelsd").solution[:, 0]
    if any(_apply(coef, s) != c for s, c in samples.items()):
        return None
    return coef


def _apply(coef: torch.Tensor, size) -> int:
    return int(round(float(torch.tensor(size, dtype=torch.float64) @ coef)))


class FlopMeter:
    """Counts (or predicts) FLOPs of the code run inside `measure()`; `enabled=False` makes it free and
    report 0. `exact=True` counts every block and checks each prediction it would have made against the
    count (`predictions`, `mismatches`): the audit the tests run. `last` is the latest block's FLOPs."""

    def __init__(self, enabled: bool = True, exact: bool = False):
        self.enabled, self.exact = enabled, exact
        self.last = 0
        self.counted = self.predictions = 0  # blocks run under FlopCounterMode; predictions made
        self.mismatches: list[tuple] = []  # (key, size, predicted, counted), exact mode only
        self._keys: dict[str, _Key] = {}

    @contextlib.contextmanager
    def measure(self, key: str = "block", size: tuple | None = None):
        if not self.enabled:
            self.last = 0
            yield self
            return
        state = self._keys.setdefault(key, _Key())
        predicted = state.predict(size)
        if predicted is not None:
            self.predictions += 1
            if not self.exact:
                if size is None:
                    state.remember(predicted)
                self.last = predicted
                yield self
                return
        counter = FlopCounterMode(display=False)
        with counter:
            yield self
        self.last = counter.get_total_flops()
        self.counted += 1
        if predicted is not None and predicted != self.last:
            self.mismatches.append((key, size, predicted, self.last))
        state.record(size, self.last)

    # ---- resume: counting changes the last bits of a backward pass (FlopCounterMode dispatches every op
    # itself), so a resumed run must count on the same steps as an uninterrupted one would
    def state_dict(self) -> dict:
        return {key: {"by_size": [[list(size), count] for size, count in k.by_size.items()],
                      "history": list(k.history), "confirmed": k.confirmed, "counted_only": k.counted_only,
                      "calls": k.calls} for key, k in self._keys.items()}

    def load_state_dict(self, state: dict) -> None:
        self._keys = {}
        for key, saved in state.items():
            k = _Key(by_size={tuple(size): count for size, count in saved["by_size"]}, history=list(saved["history"]),
                     confirmed=saved["confirmed"], counted_only=saved["counted_only"], calls=saved["calls"])
            if not k.counted_only and len(k.by_size) >= N_FEATURES:
                k.coef = _fit(k.by_size)
            self._keys[key] = k
