"""`support.timing`, the one timing helper of the benchmarks: interleaved rounds, medians of
per-round ratios."""

from __future__ import annotations

import pytest

from support.timing import Timings, interleave, timed


def recorder(calls, name, seconds):
    def run():
        calls.append(name)
        return seconds(len(calls))
    return run


def test_every_round_calls_every_contender_once_in_order_after_the_warmup():
    calls = []
    c = {n: recorder(calls, n, lambda k: 1.0) for n in "abc"}
    t = interleave(c, 2, warmup=1)
    assert calls == list("abc") * 3
    assert t.rounds == 2 and all(len(v) == 2 for v in t.times.values())


def test_rotate_starts_one_later_each_round():
    calls = []
    c = {n: recorder(calls, n, lambda k: 1.0) for n in "abc"}
    interleave(c, 4, warmup=0, rotate=True)
    assert calls == list("abc" "bca" "cab" "abc")


def test_ratio_is_the_median_of_per_round_ratios_not_a_ratio_of_medians():
    t = Timings({"x": [1.0, 10.0, 100.0], "base": [1.0, 5.0, 200.0]})
    assert t.ratio("x", "base") == pytest.approx(1.0)        # per round: 1, 2, 0.5
    assert t.median("x") / t.median("base") == pytest.approx(2.0)
    assert t.ratios("base") == {"x": pytest.approx(1.0), "base": 1.0}
    assert t.medians() == {"x": 10.0, "base": 5.0} and t.min("x") == 1.0


def test_keep_going_ends_early_and_after_round_is_told():
    done = []
    t = interleave({"a": lambda: 1.0}, 10, warmup=0, keep_going=lambda r: r < 3, after_round=done.append)
    assert t.rounds == 3 and done == [0, 1, 2]


def test_timed_averages_over_repeat_calls():
    n = []
    f = timed(lambda: n.append(1), repeat=5)
    assert f() >= 0.0 and len(n) == 5
