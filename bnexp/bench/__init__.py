"""bnexp.bench: benchmarks that compare bnexp against plain PyTorch, measured in the same process.

Timing helper shared by the benchmarks: the candidates run interleaved (one call of each per
repeat, in rotating order), so drifts in clock speed or machine load hit all of them alike, and
the median resists outliers.
"""

import statistics
import time
from collections.abc import Callable

import torch


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_samples(fns: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` samples each, after `warmup` untimed rounds.

    Calls are interleaved and the order rotates every repeat; CUDA is synchronised around each
    call when CUDA is in use, so a sample covers the kernels and not just their launch.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _synchronize()
            start = time.perf_counter()
            fns[name]()
            _synchronize()
            samples[name].append(time.perf_counter() - start)
    return samples


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function (see `time_samples`)."""
    return {name: statistics.median(s) for name, s in time_samples(fns, repeats, warmup).items()}
