"""Segment counts of a ``checkpoint(segments=k)`` stack, searched on estimated peaks.

The peak of an ``L``-step stack in ``k`` segments is close to ``a + b k + c ceil(L / k)``: the ``k``
segment inputs (and dropout tapes) kept through the forward, plus one segment's activations
recomputed in the backward. Three exact estimates fit ``a, b, c`` (:func:`fitted_peak`); the fit
proposes a count and exact estimates confirm it. The planner (:mod:`gnnspec.plan`) searches the
fewest count that fits a budget this way; where that finds none, :func:`lowest_peak_segments`
finds the count with the lowest peak (jags in ``k`` can hide it from the fit), which either fits
or is the leanest checkpoint a :class:`gnnspec.plan.NoFit` reports.

That count lies above ``round(sqrt(L))``, the default of ``checkpoint`` alone, since each layer
keeps several activations and a segment one input: on 5,000 nodes and 50,000 edges, 17 segments
for a 64-layer ``gcn`` stack (44.2 vs 57.6 MiB at 8), 62 for a 64-layer ``gen`` stack whose layers
keep ``[E, hidden]`` messages (201.7 vs 631.5 MiB). The default stays ``sqrt(L)``: more segments
recompute more layers (``(k - 1) / k`` of them), which measured 0.01-0.05 more step time at depths
4-64 (README, "Plans").
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["PeakBySegments", "PeakModel", "fitted_peak", "lowest_peak_segments"]


class PeakBySegments:
    """``peak(k)``, the exact estimated peak in ``k`` segments, each count estimated once."""

    def __init__(self, exact: Callable[[int], int]) -> None:
        self.exact = exact
        self.known: dict[int, int] = {}

    def __call__(self, k: int) -> int:
        if k not in self.known:
            self.known[k] = self.exact(k)
        return self.known[k]

    def lowest(self) -> int:
        """The estimated count with the lowest peak, the fewest among equal peaks."""
        return min(self.known, key=lambda k: (self.known[k], k))


class PeakModel:
    """``peak(k) = a + b k + c ceil(steps / k)``, fitted by :func:`fitted_peak`."""

    def __init__(self, a: float, b: float, c: float, steps: int) -> None:
        self.a, self.b, self.c, self.steps = a, b, c, steps

    def __call__(self, k: int) -> float:
        return self.a + self.b * k + self.c * -(-self.steps // k)

    def lowest(self) -> int:
        """The count in ``1..steps`` where the model is lowest."""
        return min(self._starts(), key=lambda k: (self(k), k))

    def fewest_within(self, budget: float) -> int | None:
        """The fewest count in ``1..steps`` where the model is at most ``budget``; None if none."""
        disc = (budget - self.a) ** 2 - 4 * self.b * self.c * self.steps
        # a + b k + c steps / k <= budget from k = ((budget - a) - sqrt(disc)) / 2b on (b, c > 0)
        near = (((budget - self.a) - math.sqrt(disc)) / (2 * self.b),) if self.b > 0 and disc >= 0 else ()
        return next((k for k in sorted(self._starts(near)) if self(k) <= budget), None)

    def _starts(self, near: tuple[float, ...] = (), exact_up_to: int = 2000) -> set[int]:
        """Counts where the model's lowest points lie: within a range of counts sharing one
        ``ceil(steps / k)`` it is linear, so at the range's ends; there are ``O(sqrt(steps))``
        of them. Beyond ``exact_up_to**2`` steps (where one count more or less moves the peak by
        a vanishing fraction), only the ends near ``sqrt(c steps / b)``, the minimum of
        ``a + b k + c steps / k``, and near the counts in ``near``."""
        steps = self.steps
        root = math.isqrt(steps)
        if root <= exact_up_to:
            firsts = {-(-steps // s) for s in range(1, root + 2)} | set(range(1, root + 2))
        else:
            centres = list(near)
            if self.b > 0 and self.c > 0:
                centres.append(math.sqrt(self.c * steps / self.b))
            firsts = {1, steps}
            for centre in centres:
                share = -(-steps // min(steps, max(1, int(centre))))
                firsts |= {-(-steps // s) for s in range(max(1, share - 4), share + 5)}
        return {k for f in firsts for k in (f - 1, f) if 1 <= k <= steps} | {steps}


def fitted_peak(samples: list[tuple[int, int]], steps: int) -> PeakModel | None:
    """The :class:`PeakModel` through three ``(k, peak)`` samples; None when the three do not
    determine it."""
    if len(samples) < 3:
        return None
    rows = [(1.0, float(k), float(-(-steps // k)), float(y)) for k, y in samples[:3]]
    coef = _solve3(rows)
    if coef is None:
        return None
    return PeakModel(*coef, steps)


def lowest_peak_segments(at: PeakBySegments, steps: int, window: int = 3) -> int:
    """A count in ``1..steps`` with the lowest ``at(k)`` among those estimated (the fewest among
    equal peaks). Up to 12 steps, every count; deeper, three counts near the usual minimum
    (``sqrt(steps)``, twice and four times that; or the three lowest of those ``at`` already
    estimated) fit :func:`fitted_peak`, whose minimum ``g`` is
    then searched exactly over ``g - window .. g + window``, the range widened while its lowest
    peak lies at its edge. The peak is jagged in ``k`` (how ``steps`` divides into ``k``
    segments changes the last segment's length), so this finds the lowest point of the valley
    within a few counts, with about a dozen estimates at any depth."""
    if steps <= 12:
        for k in range(1, steps + 1):
            at(k)
        return at.lowest()
    if len(at.known) >= 3:  # a search before this one: fit its three lowest points
        samples = sorted(sorted(at.known, key=lambda k: (at.known[k], k))[:3])
    else:
        root = max(1, round(math.sqrt(steps)))
        samples = sorted({root, min(steps, 2 * root), min(steps, 4 * root)})
    model = fitted_peak([(k, at(k)) for k in samples], steps)
    guess = at.lowest() if model is None else model.lowest()
    lo, hi = max(1, guess - window), min(steps, guess + window)
    for k in range(lo, hi + 1):
        at(k)
    refined: int | None = None
    for _ in range(32):  # bounded: each round widens the range 3x or evaluates new counts
        best = min((k for k in at.known if lo <= k <= hi), key=lambda k: (at.known[k], k))
        inner = min((v for k, v in at.known.items() if lo < k < hi), default=at.known[best])
        if at.known[best] >= inner * (1 - 1e-6):  # the edge is no real step down: a flat valley
            best = min((k for k in at.known if lo < k < hi), key=lambda k: (at.known[k], k), default=best)
        if best == lo and lo > 1:  # the valley goes on below: widen downwards, sparsely
            lo, hi = max(1, lo - 2 * (hi - lo)), lo
            trial = _spread(lo, hi, 2 * window + 1)
        elif best == hi and hi < steps:
            lo, hi = hi, min(steps, hi + 2 * (hi - lo))
            trial = _spread(lo, hi, 2 * window + 1)
        else:  # an inner lowest point: every count around it, then done unless that finds lower
            if refined is not None and at.known[best] >= refined:
                break
            refined = at.known[best]
            lo, hi = max(1, best - window), min(steps, best + window)
            trial = [k for k in range(lo, hi + 1) if k not in at.known]
            if not trial:
                break
        for k in trial:
            at(k)
    return at.lowest()


def _spread(lo: int, hi: int, count: int) -> list[int]:
    """About ``count`` counts spread evenly over ``lo..hi``, both ends included."""
    if hi - lo < count:
        return list(range(lo, hi + 1))
    return sorted({lo + round(i * (hi - lo) / (count - 1)) for i in range(count)})


def _solve3(rows: list[tuple[float, float, float, float]]) -> tuple[float, float, float] | None:
    """Gaussian elimination for three equations ``r[0] a + r[1] b + r[2] c = r[3]``."""
    m = [list(r) for r in rows]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return tuple(m[r][3] / m[r][r] for r in range(3))  # type: ignore[return-value]
