"""Admission reviews decided in a worker process, so that DNS never waits for one.

Contract
--------
Decoding an AdmissionReview is C code that holds the interpreter lock for as long as it runs
(about 0.1 s per MB, more for pathological JSON), and building millions of objects triggers
garbage-collector pauses: in the reactor's process, any thread doing it stalls DNS answers.  A
:class:`ReviewPool` therefore runs :func:`kubedock_dns.admission.review.render_review` in one worker
process (:mod:`kubedock_dns.admission.review_process`, started with the reactor's
``spawnProcess``: no thread, no fork of a threaded parent).  The reactor thread writes the body's
bytes to the worker's standard input and reads the finished HTTP answer
(:class:`~kubedock_dns.admission.review.Rendered`, a few KB) from its standard output, so its cost
in the DNS process is a copy of bytes, whatever the review holds.

- ``review(body)`` returns a Deferred firing, in the reactor thread, with a ``Rendered``.  It
  never fails.  The worker decides one review at a time; the others wait in order, at most
  ``max_pending`` in all (past that, 503 "busy" at once).
- Every review has a deadline, ``deadline`` seconds after it arrived (shorter than the webhook's
  ``timeoutSeconds``, so the API server hears our answer, not its own timeout).  Past it the
  review is answered 503 with the reason, so the API server applies the webhook's failure policy
  at once, and a worker still deciding it is killed (SIGKILL: a stopped process ignores
  everything else) and replaced for the next review.  A worker that died (killed for memory,
  crashed) is replaced the same way; its review answers 503.
- Memory: the worker bounds its own address space (``memory_limit``) and offers itself first to
  the kernel's OOM killer, so its death cannot take the DNS process with it; it holds one review
  at a time, and the webhook's body bound (:data:`kubedock_dns.admission.service.MAX_REVIEW_BYTES`)
  bounds each.
- The worker is started at the first review (about 0.1 s) and kept; :meth:`ReviewPool.close`
  answers what waits 503, kills the worker and returns a Deferred that fires once it is gone, or
  after ``stop_seconds`` whatever happens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from kubedock_dns.admission.review import Rendered, WebhookConfig

log = Logger()

__all__ = ["ReviewPool"]

# Where the package is, so that the worker imports this very code whatever sys.path the server
# was started with (twistd, python -c, a test's PYTHONPATH).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_WORKER_PROGRAM = "from kubedock_dns.admission.review_process import main; main()"
_LENGTH = struct.Struct("!I")

# The worker's address space.  Measured: it starts at 24 MB (20 MiB resident); the worst
# admissible review (a 4 MiB body of two million tiny values) peaks at 49 MB (44 MiB resident);
# with this bound a review needing more is answered 400 (tests/test_webhook_limits.py), and the
# pod's 256 Mi limit keeps room for the DNS process (about 100 MiB) beside it.
WORKER_MEMORY_LIMIT = 128 * 1024 * 1024


def _unavailable(reason: str) -> Rendered:
    message = f"the webhook cannot review now ({reason}); retry"
    return Rendered(503, b"text/plain; charset=utf-8", (message + "\n").encode(), "warn",
                    f"admission request answered 503: {reason}", "unavailable")


class _Review:
    __slots__ = ("body", "answer", "timer")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.answer: Deferred[Rendered] = Deferred()
        self.timer: Any = None


class _Worker(protocol.ProcessProtocol):
    """One worker process: frames its answers and tells the pool when it is gone."""

    def __init__(self, pool: "ReviewPool") -> None:
        self.pool = pool
        self._buffer = bytearray()  # appended in place: an answer of megabytes arrives in 64 KiB reads
        self._head: dict[str, Any] | None = None
        self.gone = False
        self._gone_waiters: list[Deferred[None]] = []

    @property
    def pid(self) -> int | None:
        transport: Any = self.transport
        return transport.pid if transport is not None else None

    def send(self, body: bytes) -> None:
        transport: Any = self.transport
        transport.writeToChild(0, _LENGTH.pack(len(body)) + body)

    def kill(self) -> None:
        transport: Any = self.transport
        if not self.gone and transport is not None:
            try:
                transport.signalProcess("KILL")
            except Exception:  # noqa: BLE001 - already exited (ProcessExitedAlready) or not started
                pass

    def when_gone(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.gone:
            d.callback(None)
        else:
            self._gone_waiters.append(d)
        return d

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            log.warn("admission review worker: {text}", text=data.decode("utf-8", "replace")[:2000].rstrip())
            return
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if len(self._buffer) < _LENGTH.size + length:
                return
            frame = bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
            del self._buffer[:_LENGTH.size + length]
            if self._head is None:
                self._head = json.loads(frame)
                continue
            head, self._head = self._head, None
            rendered = Rendered(int(head["status"]), str(head["content_type"]).encode("latin-1"), frame,
                                str(head["log_level"]), str(head["log_text"]), str(head["outcome"]),
                                int(head["warnings"]))
            self.pool._answered(self, rendered)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:  # its answers' pipe: closed when it exits, however it exits
            self._ended("its output closed")

    def processEnded(self, reason: Failure) -> None:
        self._ended(str(reason.value))

    def _ended(self, why: str) -> None:
        if self.gone:
            return
        self.gone = True
        self.pool._lost(self, why)
        waiters, self._gone_waiters = self._gone_waiters, []
        for d in waiters:
            d.callback(None)


class ReviewPool:
    """Runs :func:`~kubedock_dns.admission.review.render_review` for ``config`` in a worker
    process (see the module)."""

    def __init__(self, config: WebhookConfig, reactor: Any, max_pending: int = 16, deadline: float = 4.0,
                 memory_limit: int = WORKER_MEMORY_LIMIT, stop_seconds: float = 2.0) -> None:
        self.config = config
        self._reactor = reactor
        self.max_pending = max_pending
        self.deadline = deadline
        self.memory_limit = memory_limit
        self.stop_seconds = stop_seconds
        self.worker_restarts = 0
        self.overdue = 0  # reviews answered 503 at their deadline
        self._worker: _Worker | None = None
        self._waiting: deque[_Review] = deque()
        self._current: _Review | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Reviews waiting or being decided."""
        return len(self._waiting) + (self._current is not None)

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    def review(self, body: bytes) -> Deferred[Rendered]:
        if self._closed:
            return succeed(_unavailable("the server is stopping"))
        if self.pending >= self.max_pending:
            return succeed(_unavailable(f"{self.pending} reviews are waiting already"))
        review = _Review(body)
        review.timer = self._reactor.callLater(self.deadline, self._overdue, review)
        self._waiting.append(review)
        self._next()
        return review.answer

    def _next(self) -> None:
        """Hand the worker the next review, starting a worker first when there is none."""
        if self._current is not None or not self._waiting or self._closed:
            return
        if self._worker is None:
            try:
                self._worker = self._spawn()
            except OSError as e:
                log.warn("cannot start the admission review worker: {error}", error=e)
                while self._waiting:
                    self._finish(self._waiting.popleft(), _unavailable(f"the review worker cannot start: {e}"))
                return
        review = self._current = self._waiting.popleft()
        self._worker.send(review.body)
        review.body = b""  # the worker has it: do not keep a copy here as well

    def _spawn(self) -> _Worker:
        worker = _Worker(self)
        settings = {**dataclasses.asdict(self.config), "memory_limit": self.memory_limit}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self._reactor.spawnProcess(worker, sys.executable, [sys.executable, "-c", _WORKER_PROGRAM,
                                                            json.dumps(settings)],
                                   env=env, childFDs={0: "w", 1: "r", 2: "r"})
        return worker

    def _answered(self, worker: _Worker, rendered: Rendered) -> None:
        if worker is not self._worker or self._current is None:
            return  # an old worker's late answer
        review, self._current = self._current, None
        self._finish(review, rendered)
        self._next()

    def _lost(self, worker: _Worker, why: str) -> None:
        if worker is not self._worker:
            return  # replaced already
        self._worker = None
        if self._closed:
            return
        self.worker_restarts += 1
        log.warn("the admission review worker ended ({why}); a new one starts with the next review",
                 why=why[:200])
        if self._current is not None:
            review, self._current = self._current, None
            self._finish(review, _unavailable("the review worker was lost while deciding this review"))
        self._next()

    def _overdue(self, review: _Review) -> None:
        review.timer = None
        self.overdue += 1
        if review is self._current:
            worker = self._worker
            self._current = None
            self._worker = None
            self.worker_restarts += 1
            if worker is not None:
                log.warn("the admission review worker (pid {pid}) did not answer within {seconds:g} s; "
                         "killed it, a new one starts with the next review", pid=worker.pid, seconds=self.deadline)
                worker.kill()
            reason = f"the review worker did not answer within {self.deadline:g} s and was replaced"
        else:
            self._waiting.remove(review)
            reason = f"the review waited {self.deadline:g} s behind others"
        self._finish(review, _unavailable(reason))
        self._next()

    def _finish(self, review: _Review, rendered: Rendered) -> None:
        if review.timer is not None and review.timer.active():
            review.timer.cancel()
        review.timer = None
        if not review.answer.called:
            review.answer.callback(rendered)

    def close(self) -> Deferred[None]:
        """Answer what waits 503, kill the worker; fires once it is gone, or after
        ``stop_seconds`` whatever happens (a stuck process never holds the server's exit)."""
        self._closed = True
        reviews = ([self._current] if self._current is not None else []) + list(self._waiting)
        self._current = None
        self._waiting.clear()
        for review in reviews:
            self._finish(review, _unavailable("the server is stopping"))
        worker, self._worker = self._worker, None
        if worker is None or worker.gone:
            return succeed(None)
        gone = worker.when_gone()
        worker.kill()
        done: Deferred[None] = Deferred()
        def finished(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        timer = self._reactor.callLater(self.stop_seconds, finished)

        gone.addCallback(finished)
        return done
