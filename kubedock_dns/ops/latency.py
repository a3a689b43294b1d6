"""Latency histograms cheap enough for the DNS hot path, read by the metrics collector at scrape time.

:class:`LatencyHistogram` keeps per-bucket counts and a sum, updated by the reactor thread only
(no lock: the scrape runs on the reactor thread too); :meth:`LatencyHistogram.cumulative` gives
the Prometheus form.  Which queries are timed is decided by a :class:`Sampler`: one in
``--latency-sample-every`` (timing every query of the fast path costs measurable CPU, see
docs/metrics.md).  Stdlib only.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Callable

# Seconds.  A local answer takes tens of microseconds; a held one up to the hold bound (1.5 s);
# a forwarded one up to every upstream's timeout in turn.
DNS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
               1.0, 2.5, 5.0, 10.0)
# The watcher's hand-over to the reactor: normally well under a millisecond, seconds when the
# reactor is overloaded.
LAG_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Admission reviews: a worker round trip takes milliseconds; the API server waits 10 s at most.
REVIEW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Counts of observations per upper bound (``le``), plus their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DNS_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"histogram bounds must be distinct and ascending, got {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of observations <= le), ..., ("+Inf", total)]``."""
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def sampling_mask(every: int) -> int:
    """The mask that picks one query number in ``every`` (``number & mask == 0``): ``every`` must be
    0 (off: mask -1 never matches) or a power of two; ValueError says so otherwise."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0 or every & (every - 1):
        raise ValueError(f"must be 0 (off) or a power of two (1, 2, 4, ... 16, ...), got {every!r}")
    return every - 1 if every else -1


class Sampler:
    """Times one query in ``every``, and keeps what it timed: local answers and forwarded ones.

    Receipt to reply.  :meth:`start` returns the receipt time of a timed query and 0.0 for the
    others, which then pay one AND: the query's number is a counter the caller increments anyway.
    Local answers include any hold; forwarded ones any upstream that failed before one answered.
    """

    __slots__ = ("every", "mask", "clock", "answers", "forwards")

    def __init__(self, every: int = 16, clock: Callable[[], float] = time.perf_counter) -> None:
        try:
            self.mask = sampling_mask(every)
        except ValueError as e:
            raise ValueError(f"latency_sample_every {e}") from None
        self.every = every
        self.clock = clock
        self.answers = LatencyHistogram(DNS_BUCKETS)
        self.forwards = LatencyHistogram(DNS_BUCKETS)

    def start(self, number: int) -> float:
        return 0.0 if number & self.mask else self.clock()

    def answered(self, started: float) -> None:
        if started:
            self.answers.observe(self.clock() - started)

    def forwarded(self, started: float) -> None:
        if started:
            self.forwards.observe(self.clock() - started)
