"""Latency histograms cheap enough for the DNS hot path, read by the metrics collector at scrape time.

:class:`LatencyHistogram` keeps per-bucket counts and a sum, updated by the reactor thread only
(no lock: the scrape runs on the reactor thread too); :meth:`LatencyHistogram.cumulative` gives
the Prometheus form.  Which queries are timed is the server's business (one in
``--latency-sample-every``: timing every query of the fast path costs measurable CPU, see
docs/metrics.md).  Stdlib only.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds.  A local answer takes tens of microseconds; a held one up to the hold bound (1.5 s);
# a forwarded one up to every upstream's timeout in turn.
DNS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
               1.0, 2.5, 5.0, 10.0)
# The watcher's hand-over to the reactor: normally well under a millisecond, seconds when the
# reactor is overloaded.
LAG_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
