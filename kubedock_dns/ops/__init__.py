"""Operating the server: what admins and their tools see, and the bounds that keep it standing.

Instruments the serving packages use (and nothing else from here):
:mod:`~kubedock_dns.ops.logs` (rate-limited warnings, the log observer and its JSON lines),
:mod:`~kubedock_dns.ops.limits` (connection caps and their log), :mod:`~kubedock_dns.ops.latency`
(histograms cheap enough for the DNS hot path).

Operator-facing pieces, composed by :mod:`kubedock_dns.tap` only:
:mod:`~kubedock_dns.ops.endpoint` (probes, ``/metrics``, the networks view, ``/explain``),
:mod:`~kubedock_dns.ops.metrics`, :mod:`~kubedock_dns.ops.explain`, :mod:`~kubedock_dns.ops.views`,
:mod:`~kubedock_dns.ops.cli` (the ``kubedock-dns`` command), :mod:`~kubedock_dns.ops.drain`,
:mod:`~kubedock_dns.ops.build` (the version, for ``--version`` and ``kubedock_dns_build_info``).
"""
