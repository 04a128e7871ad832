"""Wall-clock comparison of several functions on a noisy machine: interleaved rounds.

Each round calls every contender once, in turn, so that load from other jobs falls on all of them
alike; a ratio is the median over rounds of the per-round ratio (the two calls were adjacent in
time), which is far steadier than a ratio of medians taken minutes apart.

    timings = interleave({"lora": timed(lambda: step(*args)), "full": timed(full)}, rounds=15)
    timings.median("lora"), timings.ratio("lora", "full"), timings.ratios("full")

A contender is a callable that returns the seconds its call took: `timed` makes one from a
function whose result is waited for with `jax.block_until_ready`; a contender that times itself
(a remote worker, a step that carries state) returns its own figure.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping

import jax

Contender = Callable[[], float]


def timed(fn: Callable[[], Any], repeat: int = 1) -> Contender:
    """A contender: seconds per call of `fn()`, averaged over `repeat` calls run back to back,
    the last result waited for with `jax.block_until_ready` (one wait per call when repeat is 1)."""
    def run() -> float:
        t0 = time.perf_counter()
        out = None
        for _ in range(repeat):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / repeat
    return run


@dataclasses.dataclass
class Timings:
    """Seconds of every round, per contender (the same number of rounds for all)."""

    times: dict[str, list[float]]

    @property
    def rounds(self) -> int:
        return min((len(t) for t in self.times.values()), default=0)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def min(self, name: str) -> float:
        return min(self.times[name])

    def medians(self) -> dict[str, float]:
        return {k: self.median(k) for k in self.times}

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of ``time[name] / time[baseline]`` within each round."""
        return statistics.median(a / b for a, b in zip(self.times[name], self.times[baseline]))

    def ratios(self, baseline: str) -> dict[str, float]:
        return {k: self.ratio(k, baseline) for k in self.times}


def interleave(contenders: Mapping[str, Contender], rounds: int, *, warmup: int = 1,
               rotate: bool = False, pause: float = 0.0,
               keep_going: Callable[[int], bool] | None = None,
               after_round: Callable[[int], None] | None = None) -> Timings:
    """Call every contender `warmup` times (untimed), then `rounds` rounds of one call each, in
    the mapping's order, or with ``rotate`` starting one later each round (so no contender always
    follows the same one). ``pause`` seconds before each call let another process's idle threads
    stop spinning. ``keep_going(r)``, asked before round r, may end the run early;
    ``after_round(r)`` is told when round r is done."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        if keep_going is not None and not keep_going(r):
            break
        order = names[r % len(names):] + names[:r % len(names)] if rotate and names else names
        for name in order:
            if pause:
                time.sleep(pause)
            times[name].append(contenders[name]())
        if after_round is not None:
            after_round(r)
    return Timings(times)
