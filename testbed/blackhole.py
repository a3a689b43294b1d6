"""A TCP proxy on loopback that can turn its connections into black holes.

Contract
--------
``BlackHoleProxy(host, port)`` listens on ``127.0.0.1`` (port 0: the kernel's choice, ``.port``)
and relays every accepted connection to ``host:port``, both ways, in threads.  ``black_hole()``
silences every connection open at that moment: from then on nothing is relayed in either
direction and nothing is closed, exactly what a dead NAT entry or a partitioned network looks
like to both ends.  Connections accepted later are relayed normally.  ``close()`` ends
everything.  TLS passes through untouched (the proxy never looks at the bytes).
"""

from __future__ import annotations

import socket
import threading

__all__ = ["BlackHoleProxy"]


class _Relay:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.silenced = threading.Event()
        self.closed = threading.Event()
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                data = source.recv(65536)
                if self.silenced.is_set():
                    self.closed.wait()  # hold the sockets open, relay nothing, until closed
                    return
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        if not self.silenced.is_set():
            self.close()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class BlackHoleProxy:
    """See the module docstring."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.relays: list[_Relay] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"blackhole-{self.port}").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.accepted += 1
                self.relays.append(_Relay(client, upstream))

    def black_hole(self) -> int:
        """Silence every open connection; returns how many there were."""
        with self._lock:
            live = [r for r in self.relays if not r.closed.is_set()]
            for relay in live:
                relay.silenced.set()
            return len(live)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            relays, self.relays = self.relays, []
        self.listener.close()
        for relay in relays:
            relay.close()

    def __enter__(self) -> "BlackHoleProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
