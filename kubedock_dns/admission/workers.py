"""Admission reviews decided in a worker process, so that DNS never waits for one.

Contract
--------
Decoding an AdmissionReview is C code that holds the interpreter lock for as long as it runs
(about 0.1 s per MB, more for pathological JSON), and building millions of objects triggers
garbage-collector pauses: in the reactor's process, any thread doing it stalls DNS answers.  A
:class:`ReviewPool` therefore runs :func:`kubedock_dns.admission.review.render_review` in one worker
process (spawned, not forked: the parent has threads).  The reactor thread hands over the body's
bytes and gets back the finished HTTP answer (:class:`~kubedock_dns.admission.review.Rendered`, a few KB),
so its cost in the DNS process is a copy of bytes, whatever the review holds.

- ``review(body)`` returns a Deferred firing, in the reactor thread, with a ``Rendered``.  It
  never fails: a worker that died (killed for memory, crashed) answers 503 with the reason and
  is replaced for the next review; past ``max_pending`` reviews waiting, 503 "busy" at once.
- The worker is started at the first review (about a second) and kept; ``close()`` stops it.
- Memory: the worker holds at most one review at a time; the body bound of the webhook
  (:data:`kubedock_dns.admission.service.MAX_REVIEW_BYTES`) bounds what one review can cost.
"""

from __future__ import annotations

import multiprocessing
import sys
from contextlib import contextmanager
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from kubedock_dns.admission.review import Rendered, WebhookConfig, render_review

log = Logger()

__all__ = ["ReviewPool"]


@contextmanager
def _main_not_reimported() -> Iterator[None]:
    """A spawned process re-imports the parent's ``__main__`` (by module name, or by file path)
    before it runs anything: an entry script without a ``__main__`` guard would run again in the
    worker, and one read from stdin cannot be found.  The worker needs only this package, so
    while processes are started ``__main__`` shows neither (the executor starts them in
    ``submit``, in this thread)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _unavailable(reason: str) -> Rendered:
    message = f"the webhook cannot review now ({reason}); retry"
    return Rendered(503, b"text/plain; charset=utf-8", (message + "\n").encode(), "warn",
                    f"admission request answered 503: {reason}", "unavailable")


class ReviewPool:
    """Runs :func:`render_review` for ``config`` in a worker process (see the module)."""

    def __init__(self, config: WebhookConfig, reactor: Any, max_pending: int = 16) -> None:
        self.config = config
        self._reactor = reactor
        self.max_pending = max_pending
        self.pending = 0
        self.worker_restarts = 0
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        return self._executor

    def review(self, body: bytes) -> Deferred[Rendered]:
        if self.pending >= self.max_pending:
            return succeed(_unavailable(f"{self.pending} reviews are waiting already"))
        executor = self._pool()
        try:
            with _main_not_reimported():
                future = executor.submit(render_review, body, self.config)
        except (BrokenProcessPool, RuntimeError) as e:
            self._replace(executor, e)
            return succeed(_unavailable(f"the review worker was lost ({type(e).__name__})"))
        self.pending += 1
        result: Deferred[Rendered] = Deferred()

        def done(finished: Future[Rendered]) -> None:  # in the executor's management thread
            self._reactor.callFromThread(self._deliver, finished, result, executor)

        future.add_done_callback(done)
        return result

    def _deliver(self, finished: Future[Rendered], result: Deferred[Rendered],
                 executor: ProcessPoolExecutor) -> None:
        self.pending -= 1
        try:
            rendered = finished.result()
        except BaseException as e:  # the worker died (BrokenProcessPool), or was stopped
            self._replace(executor, e)
            rendered = _unavailable(f"the review worker was lost ({type(e).__name__})")
        result.callback(rendered)

    def _replace(self, executor: ProcessPoolExecutor, error: BaseException) -> None:
        if executor is not self._executor:
            return  # replaced already (every review in flight fails when the worker dies)
        log.warn("the admission review worker failed ({error}); starting a new one", error=repr(error)[:200])
        self._executor = None
        self.worker_restarts += 1
        executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker (reviews in flight answer 503)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
