"""bnexp.bench.stats: paired ratios, the median's interval, the settled flag, and the repeat loop."""

import itertools
import math

import pytest

from bnexp.bench import stats


class FakeClock:
    """A timer that advances only when a timed function says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def takes(self, durations):
        it = iter(durations)

        def fn():
            self.now += next(it)
        return fn


def test_median_interval_is_the_binomial_order_statistic():
    xs = list(range(10))
    assert stats.median_interval(xs) == (1, 8)  # P(B(10, 1/2) <= 1) = 0.011 <= 0.025 < P(<= 2) = 0.055
    assert stats.median_interval(list(range(5))) == (0, 4)  # too few values: the whole range
    assert stats.median_interval([3.0]) == (3.0, 3.0)
    lo, hi = stats.median_interval(list(range(100)))
    assert (lo, hi) == (39, 60)  # P(B(100, 1/2) <= 39) = 0.018 <= 0.025 < P(<= 40) = 0.028


def test_median_interval_of_thousands_of_values():
    # comb(n, c) * 0.5 ** n overflowed a float past ~1,030 values (a long bench run collects that many)
    lo, hi = stats.median_interval(list(range(5000)))
    assert (lo, hi) == (2430, 2569)  # the normal approximation: 2499.5 -/+ 1.96 * sqrt(5000) / 2 = 69.3


def test_ratio_pairs_the_timings_of_one_repeat():
    r = stats.ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0])
    assert (r.min, r.median, r.max, r.n) == (1.0, 2.0, 3.0, 3)
    with pytest.raises(ValueError, match="differ in length"):
        stats.ratio([1.0], [1.0, 2.0])


def test_settled_means_the_interval_lies_within_half_the_tolerance():
    steady = stats.spread([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.0, 1.01, 0.99])
    assert steady.settled and "UNSETTLED" not in steady.text()
    noisy = stats.spread([0.5, 1.6, 0.7, 1.4, 0.9, 1.1, 0.6, 1.5, 1.0, 1.3])
    assert not noisy.settled and "UNSETTLED ±" in noisy.text()
    assert noisy.text().startswith("1.05x (min 0.50, max 1.60, n 10)")
    assert not stats.spread([1.0, 1.0]).settled  # two values say nothing about the spread
    edge = stats.spread([0.9] + [0.94] * 2 + [1.0] * 4 + [1.06] * 2 + [1.1])  # interval (0.94, 1.06): ±6% > ±5%
    assert edge.uncertainty == pytest.approx(0.06) and not edge.settled
    assert stats.Spread.from_json(noisy.to_json()) == noisy and noisy.to_json()["settled"] is False


def test_measure_alternates_the_sides_and_stops_once_settled():
    clock, order = FakeClock(), []
    a, b = clock.takes(itertools.repeat(2.0)), clock.takes(itertools.repeat(1.0))
    fns = {"a": lambda: (order.append("a"), a()), "b": lambda: (order.append("b"), b())}
    m = stats.measure(fns, {"a/b": ("a", "b")}, min_repeats=4, max_repeats=50, budget_s=1e9, warmup=1, timer=clock)
    assert order[:2] == ["a", "b"] and order[2:10] == list("abbaabba")  # warm-up, then AB, BA, AB, BA
    assert m.ratios["a/b"].median == 2.0 and m.ratios["a/b"].settled and len(m.samples["a"]) == 4


def test_measure_spends_its_budget_on_noise_and_says_so():
    clock = FakeClock()
    noisy = itertools.cycle([1.0, 3.0, 0.5, 2.0, 1.5])  # ratios that never settle
    fns = {"a": clock.takes(noisy), "b": clock.takes(itertools.repeat(1.0))}
    m = stats.measure(fns, {"a/b": ("a", "b")}, min_repeats=3, max_repeats=10_000, budget_s=100.0, warmup=0,
                      timer=clock)
    assert 100.0 <= m.seconds < 106.0 and not m.ratios["a/b"].settled  # stopped by the budget, not by max_repeats
    assert "UNSETTLED (a/b)" in stats.verdict(m.ratios)
    capped = stats.measure(fns, {"a/b": ("a", "b")}, min_repeats=3, max_repeats=7, budget_s=math.inf, warmup=0,
                           timer=clock)
    assert len(capped.samples["a"]) == 7


def test_measure_can_settle_a_single_side():
    clock = FakeClock()
    m = stats.measure({"x": clock.takes(itertools.repeat(5.0))}, {}, min_repeats=3, max_repeats=100, budget_s=1e9,
                      warmup=0, settle=["x"], timer=clock)
    assert len(m.samples["x"]) == 3 and stats.spread(m.samples["x"]).scaled(0.1).median == pytest.approx(0.5)


def test_compare_takes_two_callables():
    clock = FakeClock()
    s = stats.compare(clock.takes(itertools.repeat(3.0)), clock.takes(itertools.repeat(1.0)), min_repeats=5,
                      warmup=0, timer=clock)
    assert s.median == 3.0 and s.n == 5 and s.settled


def test_against_previous_names_the_ratios_that_moved():
    old = {"ratios": {"histograms": {"median": 1.4}, "step scalars": {"median": 28.0}}}
    same = {"ratios": {"histograms": {"median": 1.45}, "step scalars": {"median": 27.0}}}
    assert stats.against_previous(old, same) == ["the 2 ratio(s) agree with the previous invocation's within ±10%"]
    moved = {"ratios": {"histograms": {"median": 0.7}, "step scalars": {"median": 27.0}}}
    [line] = stats.against_previous(old, moved)
    assert line.startswith("histograms: 0.70x now, 1.40x in the previous invocation (-50%)")
    assert stats.against_previous(None, moved) == [] and stats.against_previous({"rows": []}, moved) == []


def test_read_previous_ignores_what_is_not_a_result(tmp_path):
    assert stats.read_previous(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert stats.read_previous(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1]")
    assert stats.read_previous(tmp_path / "list.json") is None
