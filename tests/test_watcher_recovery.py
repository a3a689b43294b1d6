"""How the watcher recovers: the failure count starts over after a successful relist (so the
next failure waits 0.2 s, not 10 s, and the log says "failure 1 in a row"), except while the API
server lists but its watches break at once (then the backoff keeps growing: no relist storm);
and the default timeouts notice a silent connection in seconds."""

from __future__ import annotations

from kubedock_dns.kube.client import ApiError
from kubedock_dns.kube.watcher import WatcherConfig
from tests.test_watcher import Drop, ScriptedApi, bookmark, page, run


def test_a_successful_relist_starts_the_backoff_over():
    """Eight refused lists back off up to 10 s; once a list succeeds, the watch that breaks
    after delivering a bookmark is failure 1 again (0.2 s), and so is one that breaks before
    delivering anything."""
    down = ConnectionRefusedError("connection refused")
    steps = [("list", None, down)] * 8 + [
        ("list", None, page([], "7")),
        ("watch", "7", Drop("reset before anything arrived")),
        ("list", None, page([], "9")),
    ]
    _, pauses, watcher = run(ScriptedApi(*steps), jitter=1.0)
    assert pauses == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 0.2]
    assert watcher.errors == 9


def test_lists_that_work_with_watches_that_break_at_once_keep_backing_off():
    """An API server that lists but breaks every watch at once (say, a proxy that cuts
    streams) does not get relisted five times a second: the count goes on over such relists."""
    steps = []
    for rv in range(1, 6):
        steps += [("list", None, page([], str(rv))), ("watch", str(rv), ApiError(403, "Forbidden", "no watch"))]
    steps.append(("list", None, page([], "99")))
    _, pauses, _ = run(ScriptedApi(*steps), jitter=1.0)
    assert pauses == [0.2, 0.4, 0.8, 1.6, 3.2]


def test_default_timeouts_notice_a_silent_connection_within_fifteen_seconds():
    """The server ends every watch after watch_timeout (a healthy watch is never silent
    longer), and the client gives up on a connection silent for read_timeout: above the
    first, and short enough that a change reaches the index within 15 s of the silence."""
    config = WatcherConfig(namespace="ns")
    assert config.watch_timeout < config.read_timeout
    assert config.read_timeout + config.connect_timeout / 5 < 15
