"""The DNS side: from a datagram or a TCP message to the one place that writes its reply.

- :mod:`~kubedock_dns.dns.wire`: the one home of DNS constants and strict wire reading/writing (pure);
- :mod:`~kubedock_dns.dns.query`: one query, created once, carried to its reply;
- :mod:`~kubedock_dns.dns.replies`: the wire form of our own answers (full path);
- :mod:`~kubedock_dns.dns.server`: the twisted.names protocols and factory: decide, hold, relay, reply;
- :mod:`~kubedock_dns.dns.holds`: questions waiting for the index to change;
- :mod:`~kubedock_dns.dns.fastpath`: prepared replies for the common question, and their cache;
- :mod:`~kubedock_dns.dns.udp`: the UDP port whose read loop sends prepared replies itself;
- :mod:`~kubedock_dns.dns.listeners`: the UDP and TCP listeners on one port number;
- :mod:`~kubedock_dns.dns.forwarder`, :mod:`~kubedock_dns.dns.upstreams`: what is not ours goes upstream.

Nothing here imports ``kubernetes``, :mod:`kubedock_dns.kube` or :mod:`kubedock_dns.admission`.
"""
