"""Log lines a user can act on, at a rate a log pipeline can carry; the JSON log format.

- :class:`WarningLimiter`: what a user must act on (two pods on one address, a name refused as
  invalid, every upstream failing) is logged as a warning at most once per ``interval`` per key,
  with the number of repeats that were not logged, so a broken upstream under load writes one
  line a minute instead of thousands a second.
- :func:`json_observer`: twisted.logger's JSON format (one event per line, every format field a
  JSON field), chosen by ``twistd kubedock-dns --log-format json``; it writes to twistd's
  ``--logfile`` when one is given, else to standard output (what container runtimes collect).

Per-question decision lines are debug events emitted only with ``--verbose`` (the server checks
the flag before building an event, so the hot path pays nothing otherwise).
"""

from __future__ import annotations

import sys
from typing import IO, Callable

from twisted.logger import ILogObserver, Logger, jsonFileLogObserver

_json_log_path: str | None = None


def use_json_log_file(path: str | None) -> None:
    """Where :func:`json_observer` writes (None or "-": standard output)."""
    global _json_log_path
    _json_log_path = path


def json_observer() -> ILogObserver:
    """twistd's ``--logger`` factory for ``--log-format json``: newline-delimited JSON events."""
    out: IO[str]
    if _json_log_path and _json_log_path != "-":
        out = open(_json_log_path, "a", encoding="utf-8")
    else:
        out = sys.stdout
    return jsonFileLogObserver(out, recordSeparator="")


class WarningLimiter:
    """At most one warning per key per ``interval`` seconds; repeats are counted, not logged."""

    def __init__(self, log: Logger, clock: Callable[[], float], interval: float = 60.0,
                 max_keys: int = 1024) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, format: str, **fields: object) -> bool:
        """Log ``format`` with ``fields`` unless ``key`` was logged less than ``interval`` ago.

        Returns whether it was logged.  The logged event carries ``suppressed``: how many warnings
        for the key were swallowed since the last one that was logged."""
        now = self.clock()
        due = self._next.get(key)
        if due is not None and now < due:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if due is None and len(self._next) >= self.max_keys:
            # Many distinct keys (one per conflicted address...): forget the oldest, stay bounded.
            oldest = next(iter(self._next))
            del self._next[oldest]
            self._suppressed.pop(oldest, None)
        suppressed = self._suppressed.pop(key, 0)
        self._next.pop(key, None)
        self._next[key] = now + self.interval
        self.log.warn(format + (" ({suppressed} more like this since the last report)" if suppressed else ""),
                      suppressed=suppressed, warning=key.split(":", 1)[0], **fields)
        return True
