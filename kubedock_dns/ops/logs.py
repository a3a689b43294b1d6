"""Log lines a user can act on, at a rate a log pipeline can carry, in the shape pipelines read.

- :class:`WarningLimiter`: what a user must act on (two pods on one address, a name refused as
  invalid, every upstream failing) is logged as a warning at most once per ``interval`` per key,
  with the number of repeats that were not logged, so a broken upstream under load writes one
  line a minute instead of thousands a second.
- :func:`json_line`: one event as one JSON object on one line, in the shape log pipelines and
  ``jq`` expect: ``time`` (RFC 3339, UTC, milliseconds), ``level`` (debug, info, warn, error,
  critical), ``logger`` (the emitting module), ``msg`` (the rendered message), then the event's
  own fields (``client``, ``outcome``, ``warning``...), and ``traceback`` for a failure; nothing
  of twisted.logger's bookkeeping (``log_format``, ``log_level``, ``log_flattened``...).
- :func:`observer`: twistd's ``--logger`` factory, installed by ``twistd kubedock-dns`` (see
  :func:`configure`): text lines (twistd's own format) or :func:`json_line`, filtered by level,
  to twistd's ``--logfile`` when one is given, else to standard output (what container runtimes
  collect) when running in the foreground, else ``twistd.log`` as twistd itself would.

Per-question decision lines are debug events emitted only with ``--verbose`` (the server checks
the flag before building an event, so the hot path pays nothing otherwise).  Built on
twisted.logger's public API (``formatEvent``, ``FileLogObserver``, ``FilteringLogObserver``,
``LogLevelFilterPredicate``): the JSON formatters on PyPI format the standard library's records,
and twisted.logger's bridge to those (``STDLibLogObserver``) drops the event's fields.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

FORMATS = ("text", "json")
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

# Keys of the common shape; an event field of the same name is written as "field_<name>".
_COMMON = ("time", "level", "logger", "msg", "traceback")
# What legacy (twisted.python.log) events carry besides their log_* keys: the message's parts,
# which msg already renders.
_LEGACY = frozenset(("message", "isError", "time", "format", "why", "failure", "system"))


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(event: LogEvent) -> str:
    """``event`` as one line of JSON in the common shape (see the module), newline included."""
    record: dict[str, Any] = {
        "time": _rfc3339(event.get("log_time") or 0.0),
        "level": getattr(event.get("log_level"), "name", "info"),
        "logger": event.get("log_namespace", ""),
        "msg": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception as e:  # a failure that cannot even be printed must not lose the line
            record["traceback"] = f"(unprintable traceback: {e!r})"
    legacy = event.get("log_namespace") == "log_legacy"  # what twisted.logger names old-style events
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY):
            continue
        record["field_" + key if key in _COMMON else key] = value
    try:
        return json.dumps(record, default=repr, ensure_ascii=False) + "\n"
    except (TypeError, ValueError, RecursionError):  # a field holding itself, keys that are not text...
        return json.dumps({k: v if k in _COMMON else repr(v) for k, v in record.items()}, ensure_ascii=False) + "\n"


@dataclass
class LogSettings:
    """What :func:`observer` builds: ``format`` (text or json), ``level`` (a key of
    :data:`LEVELS`), ``logfile`` (twistd's ``--logfile``; "-": standard output) and
    ``foreground`` (twistd's ``--nodaemon``: without a logfile, standard output, else
    ``twistd.log``)."""

    format: str = "text"
    level: str = "info"
    logfile: str | None = None
    foreground: bool = True


_settings = LogSettings()


def configure(settings: LogSettings) -> None:
    """What the next :func:`observer` builds (the option parser calls this; twistd then calls
    :func:`observer`, by name, when it starts logging, after the options are parsed)."""
    global _settings
    _settings = settings


def _output(settings: LogSettings) -> IO[str]:
    if settings.logfile == "-" or (not settings.logfile and settings.foreground):
        return sys.stdout
    return LogFile.fromFullPath(settings.logfile or "twistd.log")


def observer() -> ILogObserver:
    """twistd's ``--logger`` factory: the configured format and level (see the module)."""
    settings = _settings
    out = _output(settings)
    inner: ILogObserver = (FileLogObserver(out, json_line) if settings.format == "json"
                           else textFileLogObserver(out))
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[settings.level])])


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
