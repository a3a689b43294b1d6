"""The review worker process: admission reviews in on standard input, answers out on standard output.

Contract
--------
Started by :class:`kubedock_dns.admission.workers.ReviewPool` as
``python -c "from kubedock_dns.admission.review_process import main; main()" <config JSON>``,
with standard input and output as pipes to the server.  It imports the standard library and
:mod:`kubedock_dns.admission.review` only (no Twisted, klein or OpenSSL: less memory, faster
start).

- At start it bounds its own memory (``RLIMIT_AS`` to ``memory_limit`` bytes from the config) and
  offers itself to the kernel's OOM killer first (``oom_score_adj`` 1000), so that however a
  review goes, the worker dies before the DNS process it serves.
- Frames: a 4-byte big-endian length and that many bytes.  In: one frame per review, the request
  body.  Out: per review, one frame of JSON (``status``, ``content_type``, ``log_level``,
  ``log_text``, ``outcome``, ``warnings``: a :class:`~kubedock_dns.admission.review.Rendered`
  without its body) and one frame with the body.  Reviews are answered in order, one at a time.
- A review that runs out of memory is answered 400 saying so, and the worker goes on.
- End of input (the server closed the pipe, or died) ends the process.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import BinaryIO

from kubedock_dns.admission.review import Rendered, WebhookConfig, render_review

_LENGTH = struct.Struct("!I")


def bound_memory(limit: int) -> None:
    """Address space at most ``limit`` bytes (0: no bound), and first in line for the OOM killer."""
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass  # not Linux, or not allowed: the address-space bound still holds


def read_frame(stream: BinaryIO) -> bytes | None:
    """One frame, or None at the end of input."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    body = stream.read(length)
    return body if len(body) == length else None


def write_answer(stream: BinaryIO, rendered: Rendered) -> None:
    head = json.dumps({"status": rendered.status, "content_type": rendered.content_type.decode("latin-1"),
                       "log_level": rendered.log_level, "log_text": rendered.log_text,
                       "outcome": rendered.outcome, "warnings": rendered.warnings}).encode()
    stream.write(_LENGTH.pack(len(head)) + head + _LENGTH.pack(len(rendered.body)) + rendered.body)
    stream.flush()


def _out_of_memory() -> Rendered:
    message = "the review needs more memory than the webhook's review worker may use; it cannot be decided"
    return Rendered(400, b"text/plain; charset=utf-8", (message + "\n").encode(), "warn",
                    f"rejected an admission request: HTTP 400: {message}")


def serve(config: WebhookConfig, requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer every review read from ``requests`` on ``answers``, until the end of input."""
    while True:
        body = read_frame(requests)
        if body is None:
            return
        try:
            rendered = render_review(body, config)
        except MemoryError:
            body = b""
            rendered = _out_of_memory()
        del body
        write_answer(answers, rendered)


def main() -> None:
    settings = json.loads(sys.argv[1])
    bound_memory(int(settings.pop("memory_limit", 0)))
    config = WebhookConfig(**settings)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answers' pipe
    try:
        serve(config, stdin, stdout)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    os._exit(0)  # no interpreter teardown to wait for: the server may want a new worker at once
