"""The admission webhook's HTTP side: routes, TLS, and the limits on what a client can hold.

:class:`WebhookApp` serves ``POST /mutate`` (a review decided by
:func:`kubedock_dns.admission.review.render_review`, in production in the worker process of
:mod:`kubedock_dns.admission.workers`), ``GET /healthz`` and ``GET /readyz``;
:func:`webhook_service` serves it over TLS with a certificate that follows its files
(:mod:`kubedock_dns.admission.tls`).  Request bodies are bounded (:data:`MAX_REVIEW_BYTES` each,
:data:`MAX_BUFFERED_BYTES` all together, held in memory), each request must arrive whole within
:data:`REQUEST_SECONDS`, and at most :data:`MAX_CONNECTIONS` connections are open.  This module
never touches the network index.
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable

from klein import Klein
from klein.resource import KleinResource
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from kubedock_dns.admission.review import REVIEW_OUTCOMES, Rendered, WebhookConfig, render_review
from kubedock_dns.admission.tls import ReloadingServerTLS
from kubedock_dns.ops.latency import REVIEW_BUCKETS, LatencyHistogram
from kubedock_dns.ops.limits import ConnectionCap, CountedConnection, RateLimitedLog

__all__ = [
    "MAX_BUFFERED_BYTES",
    "MAX_CONNECTIONS",
    "MAX_REVIEW_BYTES",
    "REQUEST_SECONDS",
    "WebhookApp",
    "WebhookService",
    "webhook_service",
]

log = Logger()

_MAX_LOG_TEXT = 2000


# -- HTTP ------------------------------------------------------------------------------------------


class WebhookApp:
    """The webhook's HTTP routes: ``POST /mutate``, ``GET /healthz``, ``GET /readyz``.

    :param ready: called for ``/readyz``; True means ready (200), anything else 503.
    :param reviewer: turns a request body into a :class:`Rendered` answer, or a Deferred of
        one; by default :func:`render_review` in this thread (in-memory tests), in production a
        :class:`kubedock_dns.admission.workers.ReviewPool` so that DNS never waits for a review.
    :param clock: seconds, for ``review_seconds``.

    What it counts, from each answer's :class:`Rendered` (the decision is made in the worker;
    the counting happens here): ``reviews`` (outcome -> answers), ``warnings`` (admission warnings
    returned) and ``review_seconds`` (body received to answer, the worker's queue included).
    """

    app = Klein()
    log = Logger()

    def __init__(self, config: WebhookConfig, ready: Callable[[], bool] = lambda: True,
                 reviewer: Callable[[bytes], Rendered | Deferred[Rendered]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._ready = ready
        self._reviewer = reviewer if reviewer is not None else (lambda body: render_review(body, config))
        self._clock = clock
        self.reviews = dict.fromkeys(REVIEW_OUTCOMES, 0)
        self.warnings = 0
        self.review_seconds = LatencyHistogram(REVIEW_BUCKETS)

    def resource(self) -> KleinResource:
        """The twisted.web resource serving these routes."""
        return self.app.resource()

    @staticmethod
    def _text(request: Request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (text + "\n").encode()

    @app.route("/mutate", methods=["POST"])
    def mutate(self, request: Request) -> bytes | Deferred[bytes]:
        started = self._clock()
        body = request.content.read() if request.content is not None else b""
        result = self._reviewer(body)
        if isinstance(result, Rendered):
            return self._send(result, request, started)
        return result.addCallback(self._send, request, started)

    def _send(self, rendered: Rendered, request: Request, started: float) -> bytes:
        self.review_seconds.observe(self._clock() - started)
        if rendered.outcome in self.reviews:
            self.reviews[rendered.outcome] += 1
        self.warnings += rendered.warnings
        text = rendered.log_text
        if len(text) > _MAX_LOG_TEXT:  # values from the request are in it: keep lines bounded
            text = text[:_MAX_LOG_TEXT] + f"... ({len(text) - _MAX_LOG_TEXT} more characters)"
        getattr(self.log, rendered.log_level)("{text}", text=text)
        request.setResponseCode(rendered.status)
        request.setHeader(b"content-type", rendered.content_type)
        return rendered.body

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: Request) -> bytes:
        return self._text(request, 200, "ok")

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: Request) -> bytes:
        try:
            ready = self._ready() is True
        except Exception:
            self.log.failure("readiness check failed")
            ready = False
        return self._text(request, 200, "ok") if ready else self._text(request, 503, "not ready")


# The API server refuses request bodies over 3 MiB and etcd objects over 1.5 MiB, so a review (the
# object, and on UPDATE its old version) stays well below this; anything larger is not from it.
MAX_REVIEW_BYTES = 4 * 1024 * 1024
# Bodies being received are held in memory (never spooled to /tmp, which the chart sizes at
# 16 MiB); all of them together stay below this, past which new bytes get 503.
MAX_BUFFERED_BYTES = 24 * 1024 * 1024
# A request must arrive whole (headers and body) within this many seconds of its first byte,
# however slowly its bytes trickle in (the API server's webhook timeout is 10 s by default).
REQUEST_SECONDS = 10.0
MAX_CONNECTIONS = 64


def _refuse_and_close(channel: Any, code: int, phrase: str, text: str) -> None:
    """Answer a request that will not be read to its end, and close the connection."""
    body = (text + "\n").encode()
    channel.transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (code, phrase.encode(), len(body)) + body
    )
    channel.loseConnection()


class _BoundedRequest(Request):
    """A request whose body is held in memory up to :data:`MAX_REVIEW_BYTES`; a larger one is
    answered 413 as soon as its Content-Length, or its streamed size, says so."""

    _refused = False
    _counted = 0
    _site: Any = None  # the channel's site, from gotLength on
    channel: Any  # a _LimitedChannel of a _Site
    content: Any

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        self.notifyFinish().addBoth(self._release)
        # Kept: when the client goes away mid-body the channel is detached before _release runs,
        # and the bytes counted against the site's budget must still be given back.
        site: _Site = self.channel.site
        self._site = site
        if length is not None and length > site.max_body:
            self._refuse(413, "Content Too Large",
                         f"the request body has {length} bytes; an AdmissionReview has at most {site.max_body}")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        site: _Site = self.channel.site
        size = self._counted + len(data)
        if size > site.max_body:
            self._refuse(413, "Content Too Large",
                         f"the request body exceeds {site.max_body} bytes; an AdmissionReview is smaller")
            return
        if site.buffered + len(data) > site.max_buffered:
            self._refuse(503, "Service Unavailable",
                         "too many request bodies are being received at once; retry")
            return
        site.buffered += len(data)
        self._counted = size
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        channel: Any = self.channel
        channel.request_complete()
        if self._refused:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def _refuse(self, code: int, phrase: str, text: str) -> None:
        self._refused = True
        self._release()
        self.channel.request_complete()  # answered: no 408 for it later
        self.content = io.BytesIO()
        site: _Site = self.channel.site
        site.limits_log.bite(f"webhook {code}", f"webhook: answered {code} to {self.getClientAddress()}: {text}")
        _refuse_and_close(self.channel, code, phrase, text)

    def _release(self, result: object = None) -> object:
        counted, self._counted = self._counted, 0
        if counted:
            self._site.buffered -= counted
        return None

    def process(self) -> None:
        self._release()  # the body is read whole by now; the review holds its own copy
        super().process()


class _LimitedChannel(HTTPChannel):
    """An HTTP channel giving each request :data:`REQUEST_SECONDS` from its first byte to its
    last; a request still incomplete then gets 408 and the connection is closed."""

    _deadline: Any = None
    _abort_call: Any = None
    site: Any  # set by the Site that builds the channel
    transport: Any

    def dataReceived(self, data: bytes) -> None:
        if self._abort_call is not None:
            return  # answered 408 and closing: read nothing more
        if self._deadline is None and data:
            site: _Site = self.site
            self._deadline = site.clock.callLater(site.request_seconds, self._too_slow)
        super().dataReceived(data)

    def request_complete(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        site: _Site = self.site
        site.limits_log.bite(
            "webhook slow request",
            f"webhook: closed a connection from {self.transport.getPeer().host}: its request did "
            f"not arrive whole within {site.request_seconds:.0f}s",
        )
        _refuse_and_close(self, 408, "Request Timeout",
                          f"the request did not arrive whole within {site.request_seconds:.0f}s")
        # A client that reads nothing keeps the TLS close from completing: abort it then.
        self._abort_call = site.clock.callLater(5, self.transport.abortConnection)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.request_complete()
        abort = self._abort_call
        if abort is not None and abort.active():
            abort.cancel()
        super().connectionLost(reason)


class _Site(Site):
    """A Site with bounded requests (see :class:`_BoundedRequest`, :class:`_LimitedChannel`)
    and without per-request access logging (probes would flood the log)."""

    protocol = _LimitedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no h2 wrapper
    requestFactory = _BoundedRequest

    def __init__(self, resource: Resource, clock: Any, limits_log: RateLimitedLog, *,
                 max_body: int = MAX_REVIEW_BYTES, max_buffered: int = MAX_BUFFERED_BYTES,
                 request_seconds: float = REQUEST_SECONDS, timeout: float = 60) -> None:
        super().__init__(resource, timeout=timeout, reactor=clock)
        self.clock = clock
        self.limits_log = limits_log
        self.max_body = max_body
        self.max_buffered = max_buffered
        self.request_seconds = request_seconds
        self.buffered = 0  # body bytes held by requests being received, all connections

    def log(self, request: object) -> None:
        pass


class _TrackedProtocol(CountedConnection):
    """Wraps one connection so that the service can close it and know when it is closed."""

    def __init__(self, factory: Any, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.closed.callback(None)


class _ConnectionTracker(ConnectionCap):
    protocol = _TrackedProtocol


class WebhookService(Service):
    """Listens with TLS while running; ``port`` is the bound port (useful when asked for 0).

    Stopping stops listening and closes the open connections (the API server keeps idle ones
    alive), aborting those still open after ``close_timeout`` seconds; the Deferred returned by
    ``stopService`` fires when all are closed.
    """

    close_timeout = 5.0

    def __init__(
        self,
        resource: Resource,
        port: int,
        interface: str,
        tls: ReloadingServerTLS,
        reactor: Any,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_body: int = MAX_REVIEW_BYTES,
        request_seconds: float = REQUEST_SECONDS,
    ) -> None:
        self.limits_log = RateLimitedLog(reactor)
        self.site = _Site(resource, reactor, self.limits_log, max_body=max_body,
                          request_seconds=request_seconds)
        self.tls = tls
        self._connections = _ConnectionTracker(self.site, max_connections, "webhook", self.limits_log)
        self._port = port
        self._interface = interface
        self._reactor = reactor
        self.listening: Any = None  # an IListeningPort while running

    @property
    def port(self) -> int:
        """The TCP port listened on; only while running."""
        if self.listening is None:
            raise RuntimeError("the webhook service is not listening; start it first")
        return int(self.listening.getHost().port)

    def startService(self) -> None:
        self.listening = self._reactor.listenSSL(
            self._port, self._connections, self.tls, interface=self._interface
        )
        super().startService()
        log.info("webhook listening on {interface}:{port}", interface=self._interface or "*", port=self.port)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        listening, self.listening = self.listening, None
        waits: list[Deferred[Any]] = []
        if listening is not None:
            waits.append(maybeDeferred(listening.stopListening))
        for connection in list(self._connections.protocols):
            assert isinstance(connection, _TrackedProtocol)
            waits.append(connection.closed)
            transport: Any = connection.transport
            # The HTTP channel stays registered as the TLS layer's producer, and the TLS layer
            # sends its close alert only once no producer is left: unregister it.
            transport.loseConnection()
            transport.unregisterProducer()
            abort = self._reactor.callLater(self.close_timeout, transport.abortConnection)
            connection.closed.addBoth(_cancel_if_active, abort)
        return gatherResults(waits).addCallback(lambda _: None)


def _cancel_if_active(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


def webhook_service(
    app_resource: Resource,
    port: int,
    interface: str,
    cert_path: str,
    key_path: str,
    reactor: Any,
    *,
    check_interval: float = 1.0,
    **limits: Any,
) -> WebhookService:
    """A service serving ``app_resource`` over TLS on ``interface:port`` (``""``: all IPv4).

    The certificate and key are loaded now (``TLSConfigError`` names a bad file), and re-read
    at most every ``check_interval`` seconds when connections arrive.  ``reactor`` must provide
    ``IReactorSSL`` and ``IReactorTime``.  ``limits`` (``max_connections``, ``max_body``,
    ``request_seconds``) override the defaults of :class:`WebhookService`.
    """
    tls = ReloadingServerTLS(cert_path, key_path, clock=reactor, check_interval=check_interval)
    return WebhookService(app_resource, port, interface, tls, reactor, **limits)

