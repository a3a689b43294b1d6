"""Graceful stop: a replica leaves its Service before it stops answering.

Contract
--------
:class:`DrainingService` is the server's top service, a ``MultiService`` of DNS, webhook,
watcher and ops endpoint.  Stopping it (the reactor's shutdown, e.g. after SIGTERM) first
*drains*: ``draining`` turns true at once, so ``/readyz`` answers 503 with the reason and the
replica's endpoint leaves its Services, while every child keeps serving (DNS over UDP and TCP,
the webhook, the watcher, the ops endpoint) for ``seconds``.  Only then are the children
stopped, in parallel as ``MultiService`` does: no listener closes before the drain is over.
``seconds`` 0 stops at once.  One line is logged when the drain starts and one when it ends.

Why: when Kubernetes deletes a pod it sends SIGTERM while kube-proxy (on every node) is still
routing the Service's traffic to it; a replica that stopped answering at once would lose the
queries sent in that window (seen on the real node: 1 glibc lookup in 76 failed while ``helm
upgrade`` rolled the replicas).  CoreDNS' ``health { lameduck }`` does the same.

Signals (:meth:`DrainingService.handle_signals`, installed by ``twistd`` only, after the
reactor's own handlers): the first SIGTERM or SIGINT stops the reactor, and so drains, without
remembering the signal, so a drained stop exits 0 (a pod's container then ends "Completed", not
killed by its signal); a second one while draining ends the drain at once; one more after the
drain, while the children stop, ends the process at once with 128 + the signal number (works
as PID 1 too, where a re-raised signal would be ignored).  Nothing can keep the process beyond
the kubelet's ``terminationGracePeriodSeconds`` either: SIGKILL follows it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


class DrainingService(service.MultiService):
    """A MultiService whose stop first drains for ``seconds`` (see the module docstring).

    ``phase`` is "serving", then "draining" while the drain runs, then "stopping" while the
    children stop."""

    def __init__(self, reactor: Any, seconds: float) -> None:
        super().__init__()
        if not seconds >= 0:  # also refuses NaN
            raise ValueError(f"drain seconds {seconds!r}: must be 0 or more")
        self.reactor = reactor
        self.seconds = seconds
        self.phase = "serving"
        self._cut_short = ""
        self._drained: defer.Deferred[None] | None = None
        self._timer: Any = None
        self._began = 0.0
        self._signalled = False

    @property
    def draining(self) -> bool:
        return self.phase == "draining"

    def stopService(self) -> defer.Deferred[None]:
        if not self.seconds or self._cut_short:
            self.phase = "stopping"
            return defer.maybeDeferred(super().stopService)
        self.phase = "draining"
        self._began = self.reactor.seconds()
        log.info("draining for {seconds:g} s before stopping: /readyz answers 503 so that the Service "
                 "drops this replica; DNS (UDP and TCP) and the webhook keep answering", seconds=self.seconds)
        drained: defer.Deferred[None] = defer.Deferred()
        self._drained = drained
        self._timer = self.reactor.callLater(self.seconds, self._end_drain, "the drain period is over")
        drained.addCallback(lambda _: super(DrainingService, self).stopService())
        return drained

    def end_drain_now(self, why: str) -> None:
        """End the drain at once: the one under way, or the next one before it begins."""
        self._cut_short = why
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._end_drain(why)

    def _end_drain(self, why: str) -> None:
        drained, self._drained, self._timer = self._drained, None, None
        if drained is None:
            return
        self.phase = "stopping"
        log.info("drain over after {elapsed:.1f} s ({why}): stopping", why=why,
                 elapsed=self.reactor.seconds() - self._began)
        drained.callback(None)

    def handle_signals(self) -> None:
        """Take over SIGTERM and SIGINT once the reactor runs (twistd installs its own handlers
        while the reactor starts, so ours must come after them)."""
        self.reactor.callWhenRunning(self._install_handlers)

    def _install_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        # A shell starts background jobs with SIGINT ignored; the reactor leaves that so, and so do we.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, number: int, frame: Any = None) -> None:
        # Runs between two bytecodes of the reactor thread: hand work over with callFromThread
        # (which also wakes the reactor) rather than doing it here.
        name = signal.Signals(number).name
        if not self._signalled:
            self._signalled = True
            self.reactor.callFromThread(log.info, "received {signal}, stopping", signal=name)
            self.reactor.callFromThread(self.reactor.stop)
        elif self.phase != "stopping":
            self.reactor.callFromThread(self.end_drain_now, f"{name} received again")
        else:
            # The drain is over and a child is slow to stop: give up on it, never hang.
            os.write(2, f"kubedock-dns: {name} received again while stopping: exiting at once\n".encode())
            os._exit(128 + number)
