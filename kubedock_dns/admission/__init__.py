"""The admission webhook: points opted-in pods at kubedock-dns and guards their contract.

- :mod:`~kubedock_dns.admission.review`: parsing AdmissionReviews and deciding them (pure: JSON in,
  JSON out; all that the review worker process imports);
- :mod:`~kubedock_dns.admission.workers`: the worker process that decides reviews away from DNS;
- :mod:`~kubedock_dns.admission.service`: the HTTP routes over TLS and their limits;
- :mod:`~kubedock_dns.admission.tls`: the serving certificate, reloaded when its files change.

Nothing here touches the network index.
"""
