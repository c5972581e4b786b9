"""Side-by-side timing for the benchmarks: ways of doing the same work, run in
alternating trials so that machine noise hits each alike, compared by their medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_medians(ways: dict[str, Callable[[], object]], trials: int) -> dict[str, float]:
    """Median seconds of one call of each way, over `trials` alternating rounds after a
    first round that warms every way up and is not counted."""
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for trial in range(trials + 1):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            if trial:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}
