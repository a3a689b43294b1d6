"""A watch connection that goes silent (open, nothing flows) is noticed in seconds: against the
real kube-apiserver, behind a proxy that black-holes the connection without closing it, a pod
created meanwhile reaches the index within 15 s, with the watcher's default timeouts."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from kubedock_dns.kube.client import KubernetesPodApi
from kubedock_dns.kube.watcher import PodWatcher, WatcherConfig
from testbed.blackhole import BlackHoleProxy
from tests.test_watcher_apiserver import IndexModel, QueueReactor, create, watched

pytestmark = pytest.mark.controlplane


def test_a_black_holed_watch_is_replaced_and_the_change_arrives_within_15s(control_plane, core_api, namespace):
    """The watcher lists and watches through the proxy; the proxy silences the connection; a
    pod created directly on the API server then shows up within 15 s of the silence (client-go
    would take about 45 s, the previous defaults up to 90 s), through a new connection."""
    url = urlsplit(control_plane.url)
    with BlackHoleProxy(url.hostname, url.port) as proxy:
        client = control_plane.api_client()
        client.configuration.host = f"https://127.0.0.1:{proxy.port}"
        config = WatcherConfig(namespace=namespace)  # the production defaults
        reactor = QueueReactor()
        model = IndexModel(reactor)
        watcher = PodWatcher(KubernetesPodApi(client, config), config, reactor, model.deliver)
        watcher.start()
        try:
            create(core_api, namespace, "before")
            model.wait_for("the first pod", lambda: model.by_name("before") is not None)
            # The watch is open and flowing: a pod created now arrives as a watch event (an
            # event, not a pause that hopes the watch has begun).
            create(core_api, namespace, "settled")
            model.wait_for("a pod through the live watch", lambda: watched(model, "settled"))
            assert proxy.black_hole() >= 1
            silenced = time.monotonic()
            create(core_api, namespace, "during")
            model.wait_for("the pod created behind the black hole", lambda: model.by_name("during") is not None,
                           timeout=30)
            took = time.monotonic() - silenced
            print(f"change arrived {took:.1f} s after the connection went silent")
            assert took < 15, took
            assert proxy.accepted >= 2  # it came through a new connection
        finally:
            watcher.stop()
            assert watcher.join(15)
            client.close()
