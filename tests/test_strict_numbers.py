"""Numbers taken from outside (annotation keys, PTR names, ports, flags) are read by one strict
parser: ASCII digits only, bounded length.  Text that merely looks like digits gets a clear
refusal, never a traceback, an HTTP 500 or a stalled conversion."""

from __future__ import annotations

import json
import time

import pytest
from twisted.python import usage

from kubedock_dns.contract import AnnotationError, ascii_decimal, indexed_annotations
from kubedock_dns.dns.upstreams import parse_upstream
from kubedock_dns.index import reverse_name_to_ip
from kubedock_dns.options import Options
from kubedock_dns.admission.review import review
from tests.test_webhook import CONFIG, admission_review, pod

LOOKALIKES = ["²", "١", "٣٢", "𝟗", "+1", "-1", " 1", "1 ", "1_0", "", "0x1", "1.0"]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_only_ascii_digits_are_numbers(text):
    """Superscripts and other scripts' digits (which isdigit() accepts), signs, spaces and
    underscores (which int() accepts) are refused with ValueError naming the text."""
    with pytest.raises(ValueError, match="digits 0-9"):
        ascii_decimal(text, 5)


def test_huge_digit_strings_are_refused_at_once():
    """Thousands of digits are refused by length before any conversion (Python's int-conversion
    limit would raise from deep inside, and the conversion itself costs time)."""
    started = time.perf_counter()
    with pytest.raises(ValueError, match="at most 9 digits"):
        ascii_decimal("7" * 100_000, 9)
    assert time.perf_counter() - started < 0.5
    assert ascii_decimal("0", 1) == 0 and ascii_decimal("65535", 5) == 65535


@pytest.mark.parametrize("suffix", ["²", "١", "1" * 5000, "+1", "1_0"])
def test_lookalike_annotation_index_is_an_annotation_error(suffix):
    """kubedock.network/² is a contract violation (AnnotationError), not a crash."""
    with pytest.raises(AnnotationError, match="must be an index"):
        indexed_annotations({"kubedock.network/" + suffix: "net"}, "kubedock.network/")


@pytest.mark.parametrize("suffix", ["²", "٣", "9" * 5000])
def test_webhook_refuses_lookalike_annotation_index_with_a_reason(suffix):
    """A pod annotated kubedock.network/² gets a 200 review denying it (code 400) with a message
    naming the annotation: kubectl users see why, not 'internal error'."""
    obj = pod()
    obj["metadata"]["annotations"]["kubedock.network/" + suffix] = "other"
    status, document = review(json.dumps(admission_review("CREATE", obj)).encode(), CONFIG)
    assert status == 200, document
    response = document["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "kubedock.network/" in response["status"]["message"]
    assert len(response["status"]["message"]) < 1000


@pytest.mark.parametrize("label", ["²", "١", "+1", "01", "256", "1" * 4000])
def test_reverse_name_with_lookalike_octet_is_not_an_address(label):
    """A PTR name whose octet only looks like a number stands for no address (None), so the
    question is forwarded like any other outside name instead of raising."""
    assert reverse_name_to_ip([label, "0", "0", "127", "in-addr", "arpa"]) is None
    assert reverse_name_to_ip(["1", "0", "0", "127", "in-addr", "arpa"]) == "127.0.0.1"


@pytest.mark.parametrize("text", ["10.0.0.1:²", "10.0.0.1:٥٣", "[::1]:+53", "[::1]53", "10.0.0.1:" + "5" * 4000])
def test_upstream_port_must_be_ascii_digits(text):
    """--upstream HOST:PORT refuses ports that only look like numbers."""
    with pytest.raises(ValueError):
        parse_upstream(text)


@pytest.mark.parametrize("flag", ["--dns-port", "--ttl", "--ndots", "--max-forwards", "--ops-port"])
def test_numeric_flags_refuse_lookalike_digits(flag):
    """Every whole-number flag is parsed strictly and answers with a usage error."""
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--upstream", "10.0.0.1", "--namespace", "ns", flag, "٥"])


@pytest.mark.parametrize("flag", ["--hold-timeout", "--forward-timeout", "--drain-seconds"])
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_second_flags_refuse_values_that_are_not_finite(flag, text):
    """``nan`` compares false with every bound, so a check ``value <= 0`` lets it through; the
    timers would then never fire (nan) or never end (inf).  Every duration flag refuses them."""
    with pytest.raises(usage.UsageError, match="finite|must be"):
        Options().parseOptions(["--upstream", "10.0.0.1", "--namespace", "ns", flag, text])
