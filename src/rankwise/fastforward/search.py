"""Line searches along s >= 0 for the minimum of f(s) = L(W_t + s d), counting evaluations of f.

Each evaluation is one forward pass over the tiny set, so the number of calls to `f` is the cost.
    doubling:  f(0), f(1), f(2), f(4), ... until f rises (a bracket) or s hits the cap, then
               `refine_evals` parabolic (or golden-section) steps inside the bracket; keeps the best.
    linear:    f(0), f(1), f(2), ... until f rises or s hits the cap; keeps the best.
    reference: the paper's code: f(1), f(2), ... until f rises, keeping that last (worse) point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

SEARCHES = ("doubling", "linear", "reference")
REFINES = ("parabolic", "golden", "none")
GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.382: the golden-section fraction


@dataclass
class SearchResult:
    kept_s: float  # where the weights end (0 = the stage accepted nothing)
    loss_before: float  # f(0); NaN for the reference search, which never measures it
    loss_after: float  # f(kept_s)
    evals: int  # calls to f
    points: list = field(default_factory=list)  # [(s, f(s))] in evaluation order

    @property
    def moves(self) -> int:  # weight updates: one per evaluation, plus the final move to kept_s
        return self.evals + 1


class _Counted:
    def __init__(self, f: Callable[[float], float]):
        self.f, self.points = f, []

    def __call__(self, s: float) -> float:
        value = float(self.f(s))
        self.points.append((s, value))
        return value if math.isfinite(value) else math.inf  # a NaN loss is never better

    def best(self) -> tuple[float, float]:
        """The lowest point; ties go to the smaller s (the safer move)."""
        return min(((v if math.isfinite(v) else math.inf, s) for s, v in self.points))[::-1]


def line_search(f: Callable[[float], float], search: str = "doubling", cap: float = 32.0,
                refine: str = "parabolic", refine_evals: int = 1, start: float = 1.0) -> SearchResult:
    """Search s in [0, cap] for low f(s); see the module docstring for each strategy.

    `start` (doubling only): the first s tried; if f(start) is no better than f(0) the search steps
    down (s / 4) towards 1 instead. A stage warm-started near the previous stage's answer saves the doublings.
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    fc = _Counted(f)
    if search == "reference":
        return _reference(fc, cap)
    f0 = fc(0.0)
    if search == "linear":
        _linear(fc, f0, cap)
    else:
        _doubling(fc, f0, cap, refine, refine_evals, min(max(1.0, start), cap))
    s, v = fc.best()
    return SearchResult(s, f0, v, len(fc.points), fc.points)


def _reference(fc: _Counted, cap: float) -> SearchResult:
    previous, k = math.inf, 1
    while True:
        value = fc(k)
        if value >= previous or k + 1 > cap:
            break
        previous, k = value, k + 1
    return SearchResult(float(k), math.nan, fc.points[-1][1], len(fc.points), fc.points)


def _linear(fc: _Counted, f0: float, cap: float) -> None:
    previous, k = f0, 1
    while k <= cap:
        value = fc(k)
        if value >= previous:
            return
        previous, k = value, k + 1


def _doubling(fc: _Counted, f0: float, cap: float, refine: str, refine_evals: int, start: float) -> None:
    a, fa, c, fcv = 0.0, f0, None, None  # a < b < c: the bracket around the best point b
    s = start
    while s > 1.0:  # a warm start that overshoots quarters down until some s beats f(0)
        fs = fc(s)
        if fs < f0:
            break
        c, fcv, s = s, fs, max(1.0, s / 4.0)
    else:
        fs = fc(s)
    if fs >= f0:
        return  # nothing along d beats W_t: the stage accepts nothing
    b, fb = s, fs
    while c is None:  # double until f rises: f(a) > f(b) <= f(c)
        if b >= cap:
            return  # still falling at the cap: stop there
        s = min(2.0 * b, cap)
        fs = fc(s)
        if fs >= fb:
            c, fcv = s, fs
        else:
            a, fa, b, fb = b, fb, s, fs
    if refine == "none":
        return
    for _ in range(refine_evals):
        x = _parabola_vertex(a, fa, b, fb, c, fcv) if refine == "parabolic" else None
        if x is None or not (a < x < c) or abs(x - b) < 1e-3 * (c - a):
            x = b + GOLDEN * (c - b) if c - b > b - a else b - GOLDEN * (b - a)
        fx = fc(x)
        if fx < fb:  # x is the new best; the bracket shrinks around it
            if x > b:
                a, fa = b, fb
            else:
                c, fcv = b, fb
            b, fb = x, fx
        elif x > b:
            c, fcv = x, fx
        else:
            a, fa = x, fx


def _parabola_vertex(a: float, fa: float, b: float, fb: float, c: float, fc: float) -> float | None:
    """Minimum of the parabola through (a, fa), (b, fb), (c, fc); None if it opens downward."""
    p = (b - a) * (fb - fc)
    q = (b - c) * (fb - fa)
    denom = p - q
    if not denom < 0:  # convex through the three points has denom < 0; else no interior minimum
        return None
    return b - 0.5 * ((b - a) * p - (b - c) * q) / denom
