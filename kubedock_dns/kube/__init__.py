"""The Kubernetes side of kubedock-dns: the only package that imports the ``kubernetes`` client.

- :mod:`kubedock_dns.kube.client`: API clients (kubeconfig or in-cluster), the raw-JSON pod
  requests behind the watcher's :class:`~kubedock_dns.kube.watcher.PodApi` seam, API errors,
  and the one-off Service read at start-up;
- :mod:`kubedock_dns.kube.watcher`: the list + watch loop in its thread, and its service;
- :mod:`kubedock_dns.kube.policy_writer`: the ``--network-policies`` writer and its service.
"""
