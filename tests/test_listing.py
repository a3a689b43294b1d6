"""A list body decoded while it is read (kubedock_dns.kube.listing): the same items and metadata
as ``json.loads`` of the whole body, however the bytes are cut, with one item alive at a time."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc
from typing import Any, Iterator

import pytest

from kubedock_dns.kube.listing import ListBody


def pod(i: int) -> dict:
    return {"metadata": {"name": f"kubedock-{i:012x}", "uid": f"uid-{i}", "resourceVersion": str(i),
                         "annotations": {"kubedock.hostalias/0": "db", "kubedock.containername": f"c{i}é"},
                         "managedFields": [{"fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}}]},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 30},
            "status": {"phase": "Running", "podIP": f"10.0.{i // 256}.{i % 256}", "ratio": 0.25}}


def body_of(items: list, **members: Any) -> bytes:
    return json.dumps({"kind": "PodList", "apiVersion": "v1", **members, "items": items}).encode()


def cut(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    at = 0
    for size in sizes:
        if at >= len(data):
            return
        yield data[at:at + size]
        at += size
    if at < len(data):
        yield data[at:]


def decoded(chunks: Any) -> tuple[list, Any]:
    body = ListBody(chunks)
    items = list(body.items())
    return items, body.metadata


def test_items_and_metadata_equal_json_loads_for_every_cut_point():
    """Cutting the body at any byte, even inside a UTF-8 character, a string escape or a number,
    gives exactly what json.loads gives."""
    data = body_of([pod(1), {"n": 12345, "e": 1.5e-7, "s": "a\\\"b\u2603", "t": True, "z": None}],
                   metadata={"resourceVersion": "77", "continue": "tok", "remainingItemCount": 123})
    whole = json.loads(data)
    for at in range(1, len(data)):
        items, metadata = decoded([data[:at], data[at:]])
        assert items == whole["items"] and metadata == whole["metadata"], at


def test_random_documents_in_random_chunks_match_json_loads():
    """Differential: valid lists in random chunk sizes decode as json.loads does; bodies that
    json.loads refuses (or that are not a list object) raise ValueError."""
    rnd = random.Random(13)

    def value(depth: int = 0) -> Any:
        kinds = 8 if depth < 3 else 5
        pick = rnd.randrange(kinds)
        if pick == 0:
            return rnd.randint(-10**6, 10**6)
        if pick == 1:
            return rnd.random() * 1e10
        if pick == 2:
            return "é☃\"\\x" * rnd.randrange(3)
        if pick == 3:
            return rnd.choice([True, False, None])
        if pick == 4:
            return -1.5e-7
        if pick == 5:
            return {f"k{i}": value(depth + 1) for i in range(rnd.randrange(4))}
        if pick == 6:
            return [value(depth + 1) for _ in range(rnd.randrange(4))]
        return {}

    for _ in range(1500):
        members: dict[str, Any] = {"kind": value()}
        keys = ["metadata", "items", "x"]
        rnd.shuffle(keys)
        for key in keys:
            members[key] = ({"resourceVersion": str(rnd.randrange(99))} if key == "metadata"
                            else [value() for _ in range(rnd.randrange(5))] if key == "items" else value())
        text = json.dumps(members, indent=rnd.choice([None, 1]), ensure_ascii=rnd.random() < 0.5)
        if rnd.random() < 0.3:
            at = rnd.randrange(len(text))
            text = text[:at] + rnd.choice(["", "x", "}", "]", ",", '"', "1", "\\"]) + text[at + rnd.randrange(3):]
        data = text.encode()
        chunks = list(cut(data, [rnd.choice([1, 2, 3, 7, 64, 4096]) for _ in range(len(data))]))
        try:
            whole = json.loads(data)
            valid = (isinstance(whole, dict) and isinstance(whole.get("items", []), list)
                     and isinstance(whole.get("metadata", {}), dict))
        except ValueError:
            valid = False
        if valid:
            assert decoded(chunks) == (whole.get("items", []), whole.get("metadata", {})), text
        else:
            with pytest.raises(ValueError):
                decoded(chunks)


@pytest.mark.parametrize("data, error", [
    (b"", "ends early|expected '{'"),
    (b"[]", "expected '{'"),
    (b'{"items": {}}', "not an array"),
    (b'{"items": [1, 2}', "expected ',' or ']'"),
    (b'{"items": [{"a": 1}]', "expected ',' or '}'"),
    (b'{"items": [], "metadata": 3}', "metadata is not an object"),
    (b'{"items": []} {}', "extra data"),
    (b'{"items": [], "items": []}', "'items' twice"),
    (b'{"items": ["\xff"]}', "utf-8"),
    (b'{"items": ["\xe2\x98', "utf-8|Unterminated"),
])
def test_bad_bodies_raise_value_error_naming_the_problem(data, error):
    """What json.loads refuses, or what is not a list object, raises ValueError with a reason."""
    with pytest.raises(ValueError, match=error):
        decoded(cut(data, [3] * len(data)))


def test_items_before_a_bad_part_are_yielded_first():
    """Items are handed out as they complete: a failure later in the body leaves them valid."""
    body = ListBody([b'{"items": [{"a": 1}, {"b": 2}, oops]}'])
    items = body.items()
    assert next(items) == {"a": 1} and next(items) == {"b": 2}
    with pytest.raises(ValueError):
        next(items)
    with pytest.raises(RuntimeError, match="metadata"):
        body.metadata


def test_absent_or_null_members_read_as_empty():
    """No metadata or null metadata is {}; null items are none (as the watcher always treated them)."""
    assert decoded([b'{"items": null, "metadata": null}']) == ([], {})
    assert decoded([b"{}"]) == ([], {})


def test_a_value_longer_than_the_bound_is_refused():
    """A value that never ends within the bound raises instead of buffering without end."""
    def endless() -> Iterator[bytes]:
        yield b'{"items": ["'
        while True:
            yield b"x" * 1000

    with pytest.raises(ValueError, match="longer than 100000"):
        list(ListBody(endless(), max_value_chars=100_000).items())


def test_stopping_early_closes_the_chunks_at_once():
    """A reader that stops after one item (or a bad body) closes the chunk iterator, so the
    connection behind it is let go without waiting for garbage collection."""
    closed = []

    def chunks() -> Iterator[bytes]:
        try:
            yield body_of([pod(1), pod(2)])
        finally:
            closed.append(True)

    items = ListBody(chunks()).items()
    next(items)
    items.close()
    assert closed == [True]


def test_items_can_be_read_once():
    """The body is read from the network as it goes: a second pass is an error, not an empty list."""
    body = ListBody.of(body_of([]))
    list(body.items())
    with pytest.raises(RuntimeError):
        list(body.items())


def test_memory_peak_is_one_item_not_one_page():
    """Reading 2,000 pods in 64 KiB chunks, keeping only one field of each, peaks at a small
    fraction of what json.loads of the same body holds at once (the reason this module exists)."""
    data = body_of([pod(i) for i in range(2000)], metadata={"resourceVersion": "1"})
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    gc.collect()
    tracemalloc.start()
    try:
        kept = [item["metadata"]["uid"] for item in json.loads(data)["items"]]
        _, whole_peak = tracemalloc.get_traced_memory()
        del kept
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        body = ListBody(iter(chunks))
        kept = [item["metadata"]["uid"] for item in body.items()]
        _, streamed_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 2000 and body.metadata == {"resourceVersion": "1"}
    assert streamed_peak - base < whole_peak / 5, (streamed_peak - base, whole_peak)
