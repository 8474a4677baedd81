"""bnexp.bench: benchmarks that compare bnexp against plain PyTorch, measured in the same process.

Every benchmark times its sides interleaved and reports the min / median / max of paired ratios
through `bnexp.bench.stats`, which also says when a ratio is not settled within ±10%.
This package imports no torch itself, so a benchmark of the command line stays light.
"""

import statistics
from collections.abc import Callable

from .stats import time_samples


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function (see `stats.time_samples`)."""
    return {name: statistics.median(s) for name, s in time_samples(fns, repeats, warmup).items()}


__all__ = ["time_interleaved", "time_samples"]
