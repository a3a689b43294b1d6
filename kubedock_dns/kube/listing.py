"""A Kubernetes list body decoded while it is read: one item alive at a time.

Contract
--------
:class:`ListBody` takes the body of a list response (``{"kind": ..., "metadata": {...},
"items": [...]}``) as an iterable of UTF-8 byte chunks, read lazily.  :meth:`ListBody.items`
yields the elements of the top-level ``items`` array one by one, each as ``json.loads`` would
decode it, as soon as its last byte has arrived; once the iteration has ended,
:attr:`ListBody.metadata` holds the top-level ``metadata`` object (``{}`` when absent or null;
``items`` null counts as none).  Members
before and after ``items`` may come in any order.  The whole body is checked as it goes: anything
``json.loads`` would refuse, a top level that is not an object, ``items`` that is not an array, a
body that ends early or carries anything after the closing brace raises ``ValueError`` (the
items yielded before it stay valid).  A single value longer than ``max_value_chars`` raises
``ValueError`` instead of being buffered without end.  When the iteration stops early (the
reader stops, or the body is bad), the chunk iterator is closed at once, if it can be.

Why: decoding a page of 500 pods with ``json.loads`` builds every pod's dicts at once (about
15 KiB each) beside the page's bytes and text; the pods then live only until they are trimmed
into records.  Here at most one chunk of text and one pod's dicts are alive, so listing 10,000
pods costs no more memory at its peak than listing one (docs/benchmarks.md, memory at 10,000
pods).  Pure: stdlib only.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, Iterable, Iterator, Mapping

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
_NUMBER_CHARS = frozenset("0123456789+-.eE")


class ListBody:
    """See the module docstring.  ``items()`` may be iterated once."""

    def __init__(self, chunks: Iterable[bytes], max_value_chars: int = 16 * 1024 * 1024) -> None:
        self._chunks = iter(chunks)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = ""
        self._pos = 0
        self._ended = False  # no more chunks
        self._max = max_value_chars
        self._metadata: Mapping[str, Any] | None = None
        self._started = False

    @classmethod
    def of(cls, body: bytes | str) -> ListBody:
        """A body that is already read whole (tests, small lists)."""
        return cls((body.encode() if isinstance(body, str) else body,))

    @property
    def metadata(self) -> Mapping[str, Any]:
        if self._metadata is None:
            raise RuntimeError("the list's metadata is known only once its items have been read")
        return self._metadata

    def items(self) -> Iterator[Any]:
        if self._started:
            raise RuntimeError("a ListBody's items can be read once")
        self._started = True
        try:
            yield from self._members()
        finally:
            if self._metadata is None:  # stopped early or failed: let the connection go now
                close = getattr(self._chunks, "close", None)
                if close is not None:
                    close()

    def _members(self) -> Iterator[Any]:
        metadata: Any = None
        self._expect("{")
        if self._peek() == "}":
            self._pos += 1
        else:
            seen_items = False
            while True:
                key = self._value()
                if not isinstance(key, str):
                    raise ValueError(f"expected a member name at character {self._offset()}")
                self._expect(":")
                if key == "items":
                    if seen_items:
                        raise ValueError("the list carries 'items' twice")
                    seen_items = True
                    yield from self._array()
                else:
                    value = self._value()
                    if key == "metadata":
                        metadata = value
                if self._next_of(",}") == "}":
                    break
        if self._peek() != "":
            raise ValueError(f"extra data after the list at character {self._offset()}")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, Mapping):
            raise ValueError(f"the list's metadata is not an object: {type(metadata).__name__}")
        self._metadata = metadata

    # -- the scanner ---------------------------------------------------------------------------

    def _array(self) -> Iterator[Any]:
        if self._peek() == "n" and self._value() is None:
            return
        if self._peek() != "[":
            raise ValueError(f"the list's items are not an array (character {self._offset()})")
        self._pos += 1
        if self._peek() == "]":
            self._pos += 1
            return
        while True:
            yield self._value()
            if self._next_of(",]") == "]":
                return

    def _offset(self) -> str:
        return f"{self._pos} of the text buffered"

    def _more(self) -> bool:
        """Append the next chunk's text (dropping what was consumed); False at the end."""
        if self._ended:
            return False
        for chunk in self._chunks:
            text = self._utf8.decode(chunk)
            if text:
                self._text = self._text[self._pos:] + text
                self._pos = 0
                return True
        self._utf8.decode(b"", final=True)  # a cut multi-byte character raises here
        self._ended = True
        return False

    def _peek(self) -> str:
        """The next non-whitespace character ('' at the end of the body), not consumed."""
        while True:
            text, pos = self._text, self._pos
            while pos < len(text) and text[pos] in _WHITESPACE:
                pos += 1
            self._pos = pos
            if pos < len(text):
                return text[pos]
            if not self._more():
                return ""

    def _expect(self, char: str) -> None:
        found = self._peek()
        if found != char:
            raise ValueError(f"expected {char!r} at character {self._offset()}, found {found or 'the end'!r}")
        self._pos += 1

    def _next_of(self, chars: str) -> str:
        found = self._peek()
        if not found or found not in chars:
            wanted = " or ".join(repr(c) for c in chars)
            raise ValueError(f"expected {wanted} at character {self._offset()}, found {found or 'the end'!r}")
        self._pos += 1
        return found

    def _value(self) -> Any:
        """The next complete JSON value.  A value cut by the end of the buffer fails to decode (or,
        for a number, ends at the buffer's end): read on, at least doubling what is buffered, so
        that a value split over many chunks is retried only logarithmically often."""
        if not self._peek():
            raise ValueError("the list ends early")
        while True:
            try:
                value, end = _DECODER.raw_decode(self._text, self._pos)
            except json.JSONDecodeError:
                if not self._read_at_least_double():
                    raise
                continue
            if self._number_may_go_on(value, end) and self._read_at_least_double():
                continue
            self._pos = end
            return value

    def _number_may_go_on(self, value: Any, end: int) -> bool:
        """A number that reaches the end of the buffer (``12`` of ``123``, ``1`` of ``1e5``) may
        go on in the next chunk."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        text = self._text
        while end < len(text) and text[end] in _NUMBER_CHARS:
            end += 1
        return end == len(text)

    def _read_at_least_double(self) -> bool:
        pending = len(self._text) - self._pos
        if pending > self._max:
            raise ValueError(f"a value of the list is longer than {self._max} characters")
        target = max(2 * pending, pending + 1)
        grew = False
        while len(self._text) - self._pos < target and self._more():
            grew = True
        return grew
