"""Upstreams that misbehave on purpose: real UDP/TCP sockets on loopback, scripted replies."""

from __future__ import annotations

import socket
import struct
import threading


class _LoopbackUpstream:
    """A socket on a port the kernel picks, served by a thread until :meth:`close`; ``received``
    counts the queries read."""

    def __init__(self, kind: int, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind((host, 0))
        if kind == socket.SOCK_STREAM:
            self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def upstream_arg(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _serve(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class ScriptedUpstream(_LoopbackUpstream):
    """Answers every query with ``rcode`` (e.g. SERVFAIL), or never answers when ``silent``."""

    def __init__(self, rcode: int = 2, silent: bool = False, host: str = "127.0.0.1") -> None:
        self.rcode = rcode
        self.silent = silent
        super().__init__(socket.SOCK_DGRAM, host)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except (socket.timeout, OSError):
                continue
            self.received += 1
            if self.silent or len(data) < 12:
                continue
            qid, flags = struct.unpack("!HH", data[:4])
            reply_flags = 0x8000 | (flags & 0x0100) | 0x0080 | self.rcode
            self.sock.sendto(struct.pack("!HHHHHH", qid, reply_flags, 1, 0, 0, 0) + data[12:], peer)


def closed_port(host: str = "127.0.0.1") -> str:
    """An address where nothing listens (ICMP port unreachable, or silence)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return f"{host}:{port}"


class ScriptedTCPUpstream(_LoopbackUpstream):
    """A TCP upstream that answers each connection's first query with ``reply(query)``: the bytes
    it returns are sent length-prefixed as they are, so a test can script a short, foreign or
    mismatched answer."""

    def __init__(self, reply, host: str = "127.0.0.1") -> None:
        self.reply = reply
        super().__init__(socket.SOCK_STREAM, host)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    length = struct.unpack("!H", _read_exactly(conn, 2))[0]
                    query = _read_exactly(conn, length)
                except (OSError, EOFError):
                    continue
                self.received += 1
                answer = self.reply(query)
                try:
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
                except OSError:
                    continue


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("the connection closed early")
        data += chunk
    return data
