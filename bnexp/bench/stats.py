"""Timing statistics every benchmark shares: interleaved repeats, paired ratios, and an honest spread.

Why paired ratios: on a shared machine the load changes from second to second, so the median of
side A and the median of side B can come from different moments (one invocation of `bnexp bench
log` gave 0.5x, the next 1.6x). Timing A and B back to back in each repeat, in alternating order
(AB, BA, AB, ...), and taking the ratio of each pair cancels most of that drift; the median of the
pair ratios is what we report, with their min and max.

Why a flag: a median of a few noisy ratios can still move between invocations. The distribution-free
95% confidence interval of the median (binomial order statistics) says how far. A ratio is `settled`
when that interval lies within ±TOLERANCE / 2 of the median: two invocations whose medians are each
that close to the true ratio agree with each other within ±TOLERANCE. Otherwise every table says
so instead of printing a single number. (Within ±TOLERANCE was not enough: four invocations of the
log benchmark, each with an interval inside ±10%, gave 1.39x to 1.86x, because the load on a shared
machine changes between invocations, not only between repeats.) `measure` keeps adding repeats until every ratio asked for is settled, or its
repeat or time budget is spent.

Torch-free (torch is synchronised only if something else imported it), so command-line benchmarks
that time subprocesses can use it without paying torch's import.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

TOLERANCE = 0.10  # three invocations of a benchmark should agree within ±10% (README, Performance)
CONFIDENCE = 0.95


def _synchronize() -> None:
    """Wait for queued CUDA kernels, so that a sample covers them and not just their launch."""
    torch = sys.modules.get("torch")  # a benchmark that never imported torch has no kernels in flight
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x_(c), x_(n-1-c)
    (0-based) for the largest c with P(Binomial(n, 1/2) <= c) <= (1 - confidence) / 2, which cover the
    median with probability 1 - 2 P(B <= c). Too few values for that: (min, max)."""
    xs = sorted(values)
    n = len(xs)
    # exact integers: comb(n, c) * 0.5 ** n overflows a float once n passes ~1,030 values
    alpha, whole = Fraction(1 - confidence) / 2, 2 ** n
    c, term, tail = 0, 1, 1  # term = comb(n, c), tail = sum of comb(n, k) for k <= c
    while 2 * (c + 1) < n:
        term = term * (n - c) // (c + 1)
        if Fraction(tail + term, whole) > alpha:
            break
        c, tail = c + 1, tail + term
    return xs[c], xs[n - 1 - c]


@dataclass(frozen=True)
class Spread:
    """min / median / max of repeated values (seconds, or ratios of paired timings), the confidence
    interval of the median, and whether it lies within ±tolerance / 2 of the median (`settled`)."""
    min: float
    median: float
    max: float
    n: int
    low: float  # CONFIDENCE interval of the median
    high: float
    tolerance: float = TOLERANCE

    @property
    def settled(self) -> bool:
        return self.n >= 3 and self.uncertainty <= self.tolerance / 2

    @property
    def uncertainty(self) -> float:
        """The larger distance from the median to an end of its interval, relative to the median."""
        return max(self.median - self.low, self.high - self.median) / self.median if self.median else math.inf

    def scaled(self, factor: float) -> "Spread":
        """The same spread in other units (ms instead of s, time against a target)."""
        return Spread(self.min * factor, self.median * factor, self.max * factor, self.n, self.low * factor,
                      self.high * factor, self.tolerance)

    def text(self, unit: str = "x", digits: int = 2) -> str:
        """`1.42x (min 1.10, max 1.90, n 20)`, and `UNSETTLED ±23%` when it is not settled."""
        f = lambda v: f"{v:.{digits}f}"
        out = f"{f(self.median)}{unit} (min {f(self.min)}, max {f(self.max)}, n {self.n})"
        return out if self.settled else f"{out} UNSETTLED ±{100 * self.uncertainty:.0f}%"

    def to_json(self) -> dict:
        return {**asdict(self), "settled": self.settled}

    @classmethod
    def from_json(cls, d: Mapping) -> "Spread":
        """The Spread a result file holds (`to_json`; the derived `settled` is recomputed)."""
        return cls(**{k: d[k] for k in ("min", "median", "max", "n", "low", "high", "tolerance")})


def spread(values: Sequence[float], tolerance: float = TOLERANCE) -> Spread:
    """The Spread of one side's repeated values."""
    if not values:
        raise ValueError("spread of no values")
    low, high = median_interval(values)
    return Spread(min(values), statistics.median(values), max(values), len(values), low, high, tolerance)


def ratio(numerators: Sequence[float], denominators: Sequence[float], tolerance: float = TOLERANCE) -> Spread:
    """The Spread of the paired ratios numerators[i] / denominators[i] (timings of the same repeat)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"paired timings differ in length: {len(numerators)} and {len(denominators)}")
    return spread([a / b for a, b in zip(numerators, denominators)], tolerance)


@dataclass(frozen=True)
class Measurement:
    """What `measure` returns: every side's samples (seconds) and the Spread of each ratio asked for."""
    samples: dict[str, list[float]]
    ratios: dict[str, Spread]
    seconds: float  # wall time of the timed repeats

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


def measure(fns: Mapping[str, Callable[[], object]], ratios: Mapping[str, tuple[str, str]] | None = None, *,
            min_repeats: int = 10, max_repeats: int = 200, budget_s: float = 30.0, warmup: int = 2,
            tolerance: float = TOLERANCE, settle: Sequence[str] = (),
            timer: Callable[[], float] = time.perf_counter) -> Measurement:
    """Time every function once per repeat, in an order that rotates every repeat (with two sides:
    AB, BA, AB, ...), after `warmup` untimed rounds; stop once every ratio {label: (numerator,
    denominator)} is settled (and the own times of the functions named in `settle`, for a benchmark
    with one side) and `min_repeats` are done, or at `max_repeats`, or once `budget_s` seconds of
    repeats are spent (then the unsettled ratios say so). Without `ratios`, the first function
    against each other one."""
    names = list(fns)
    if ratios is None:
        ratios = {f"{a}/{names[0]}": (a, names[0]) for a in names[1:]}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = timer()
    r = 0
    while r < max_repeats:
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _synchronize()
            t0 = timer()
            fns[name]()
            _synchronize()
            samples[name].append(timer() - t0)
        r += 1
        if r >= min_repeats and (timer() - start >= budget_s or (
                all(ratio(samples[a], samples[b], tolerance).settled for a, b in ratios.values())
                and all(spread(samples[name], tolerance).settled for name in settle))):
            break
    return Measurement(samples, {label: ratio(samples[a], samples[b], tolerance) for label, (a, b) in ratios.items()},
                       timer() - start)


def compare(a: Callable[[], object], b: Callable[[], object], **kwargs) -> Spread:
    """The Spread of time(a) / time(b) over interleaved repeats (see `measure` for the keywords)."""
    return measure({"a": a, "b": b}, {"a/b": ("a", "b")}, **kwargs).ratios["a/b"]


def time_samples(fns: Mapping[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, exactly `repeats` samples each (interleaved, see `measure`)."""
    return measure(fns, {}, min_repeats=repeats, max_repeats=repeats, budget_s=math.inf, warmup=warmup).samples


def verdict(spreads: Mapping[str, Spread]) -> str:
    """The line under a benchmark's table: whether another invocation should agree within the tolerance."""
    if not spreads:
        return "nothing to compare"
    loose = [label for label, s in spreads.items() if not s.settled]
    tol = f"±{100 * next(iter(spreads.values())).tolerance:.0f}%"
    if not loose:
        return (f"every ratio is settled: the 95% interval of its median lies within half of {tol}, so "
                f"another invocation under the same load should agree within {tol}")
    return (f"UNSETTLED ({', '.join(loose)}): the 95% interval of the median is wider than half of {tol} within the "
            f"repeat budget, so another invocation may disagree by more than {tol} (a loaded machine?)")


def read_previous(path) -> dict | None:
    """The result a previous invocation wrote to `path`, or None (none, or not a readable result)."""
    import json
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def against_previous(previous: Mapping | None, result: Mapping, tolerance: float = TOLERANCE) -> list[str]:
    """Lines comparing this invocation's `ratios` with those of the previous invocation's result (the
    JSON it left, or None): each ratio that moved by more than ±tolerance, or one line that they agree."""
    old = (previous or {}).get("ratios") or {}
    common = [label for label in result.get("ratios", {}) if (old.get(label) or {}).get("median")]
    if not common:
        return []
    out = []
    for label in common:
        now, before = result["ratios"][label]["median"], old[label]["median"]
        if abs(now / before - 1) > tolerance:
            out.append(f"{label}: {now:.2f}x now, {before:.2f}x in the previous invocation ({100 * (now / before - 1):+.0f}%): "
                       f"the two invocations disagree by more than ±{100 * tolerance:.0f}%")
    return out or [f"the {len(common)} ratio(s) agree with the previous invocation's within ±{100 * tolerance:.0f}%"]
