"""The kubedock-dns benchmark suite: ``python -m bench.run [--quick]``.

Serves one generated topology of kubedock pods from kubedock-dns and from its peers (CoreDNS with
the hosts plugin, dnsmasq, a naive twisted.names server), loads each with ``dnsperf`` from pod
source addresses in 127.0.0.0/8, and writes ``docs/benchmarks.md`` and ``docs/benchmarks.png``.
Nothing here is imported by the product; the suite is a plain package, not installed.
"""
