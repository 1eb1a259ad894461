"""Distributions: medians and p99 with their sample counts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of already sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return sorted_values[low] * (1 - weight) + sorted_values[high] * weight


@dataclass(frozen=True, slots=True)
class Dist:
    """A summary of samples: median, p99 (``None`` when too few), min, max and count."""

    median: float
    p99: float | None
    minimum: float
    maximum: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float], *, scale: float = 1.0) -> Dist:
        """Summarise ``samples`` multiplied by ``scale`` (e.g. 1000 for seconds to ms).

        A p99 needs at least 20 samples to say more than "the maximum"; with
        fewer it is left out.
        """
        values = sorted(v * scale for v in samples)
        if not values:
            return cls(math.nan, None, math.nan, math.nan, 0)
        p99 = quantile(values, 0.99) if len(values) >= 20 else None
        return cls(quantile(values, 0.5), p99, values[0], values[-1], len(values))
