"""The container image, built for real: what a user builds, pushes and runs.

The repository's ``Dockerfile`` is built unchanged by podman (buildah) with the very commands
docs/install.md gives (read from it and run by ``bash``), on a Debian base made here by
debootstrap because ``python:3.11-slim`` cannot be pulled (:mod:`testbed.image`); the only
differences are the settings this machine needs, added by a ``podman`` shim on ``PATH``:
the test bed's storage, ``--isolation chroot`` and ``PYTHON_IMAGE``.  The image is
pushed to a real registry (Debian's docker-registry on loopback), removed locally, pulled back,
and run the way the chart runs it: uid 10001, read-only root filesystem, a writable ``/tmp``, all
capabilities dropped, no privilege escalation, the TLS Secret mounted read-only with mode 0440.
It must then serve DNS (``dig`` from a pod's address gets that pod's network's answer, and a
cluster name is forwarded), the webhook (TLS, ``/healthz``, a real mutation) and the ops
endpoint (``/readyz``, ``/metrics``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from testbed.tls import generate_ca_and_cert
from testbed.image import Podman, PodmanUnavailable, Registry, debian_base, podman_shim
from testbed.ports import listening_ports
from testbed.upstream import Dnsmasq
from tests.podfactory import kubedock_pod, network_id

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parent.parent
INSTALL_DOC = REPO / "docs" / "install.md"
TAG = "0.1.0-test"
UID = 10001

# Loopback only: never through a proxy the environment may name.
urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


def documented_podman_commands() -> str:
    """The ``podman build ... && podman push ...`` line of docs/install.md section 1."""
    section = INSTALL_DOC.read_text().split("## 1.", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("podman build ")]
    assert len(lines) == 1, f"docs/install.md section 1 should give one podman build line, found {lines}"
    assert "podman push" in lines[0]
    return lines[0]


class Built:
    """The image as built, pushed and pulled back once for this module."""

    def __init__(self, podman: Podman, registry: Registry, ref: str, image_id: str, build_log: str) -> None:
        self.podman = podman
        self.registry = registry
        self.ref = ref
        self.image_id = image_id
        self.build_log = build_log


@pytest.fixture(scope="module")
def podman() -> Podman:
    try:
        return Podman()
    except PodmanUnavailable as e:
        pytest.skip(str(e))


def _firewall_rules() -> set[str]:
    """The machine's iptables rules that podman's network stack (netavark) owns."""
    rules = set()
    for table in ("nat", "filter"):
        result = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True, timeout=60)
        rules |= {f"{table}: {line}" for line in result.stdout.splitlines() if "NETAVARK" in line.upper()}
    return rules


@pytest.fixture(scope="module")
def built(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Built, pushed and pulled back once; afterwards the image is gone from the store, and
    neither the builds (chroot isolation) nor the runs (host or no network) left podman
    firewall rules behind on this shared machine."""
    rules_before = _firewall_rules()
    work = tmp_path_factory.mktemp("image")
    with Registry(work) as registry:
        shim_dir = work / "bin"
        shim_dir.mkdir()
        podman_shim(podman, shim_dir, build_args={"PYTHON_IMAGE": debian_base(podman)})
        env = dict(os.environ, REGISTRY=registry.address, TAG=TAG,
                   PATH=f"{shim_dir}{os.pathsep}{os.environ['PATH']}")
        command = documented_podman_commands()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, (f"the documented build failed ({result.returncode}): {command}\n"
                                        f"{(result.stdout + result.stderr)[-4000:]}")
        ref = f"{registry.address}/kubedock-dns:{TAG}"
        image_id = podman("image", "inspect", "--format", "{{.Id}}", ref).strip()
        # Forget the local copy: everything below runs what came back from the registry.
        podman("rmi", "--force", ref)
        assert not podman.image_exists(ref)
        podman("pull", "--tls-verify=false", ref)
        yield Built(podman, registry, ref, image_id, result.stdout + result.stderr)
        podman("rmi", "--force", ref)
    assert _firewall_rules() <= rules_before, f"podman left firewall rules: {_firewall_rules() - rules_before}"


def test_documented_push_reaches_the_registry_and_pulls_back_identical(built: Built) -> None:
    """The push stored the tag in the registry, with a manifest naming the image's config and
    its layers, and the image pulled back from it is the image that was built (same ID, i.e.
    the same configuration digest)."""
    assert TAG in built.registry.tags("kubedock-dns")
    manifest = built.registry.manifest("kubedock-dns", TAG)
    assert manifest["config"]["digest"] == f"sha256:{built.image_id}"
    assert len(manifest["layers"]) >= 2  # the base and the application
    pulled = built.podman("image", "inspect", "--format", "{{.Id}}", built.ref).strip()
    assert pulled == built.image_id


def test_image_config_matches_the_charts_security_context(built: Built) -> None:
    """The image runs as the numeric uid the chart's runAsNonRoot/runAsUser check, starts twistd
    in exec form (signals reach it; no pid file on a read-only root) and exposes the ports the
    chart wires."""
    config = json.loads(built.podman("image", "inspect", "--format", "{{json .Config}}", built.ref))
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["twistd", "--nodaemon", "--pidfile=", "kubedock-dns"]
    assert set(config["ExposedPorts"]) == {"5353/udp", "5353/tcp", "8443/tcp", "8080/tcp"}


def test_image_holds_the_package_but_no_tests_pip_or_sources(built: Built) -> None:
    """Only the package and its dependencies are installed: not the tests or the test bed (the
    build context is an allow-list), no pip (nothing installs at run time), no source tree,
    and Twisted's plugin cache is already written."""
    probe = (
        "import importlib.util as u, pathlib, kubedock_dns, twisted.plugins.kubedock_dns;"
        "site = pathlib.Path(kubedock_dns.__file__).parent.parent;"
        "print(u.find_spec('testbed') is None, u.find_spec('tests') is None, u.find_spec('pip') is None,"
        " pathlib.Path('/src').exists(), (site / 'twisted/plugins/dropin.cache').exists())"
    )
    out = built.podman("run", "--rm", "--network", "none", "--entrypoint", "python", built.ref, "-c", probe)
    assert out.split() == ["True", "True", "True", "False", "True"]


def _dig(server_port: int, source: str, name: str, *extra: str) -> str:
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(server_port), "-b", source, "+tries=1", "+time=3", *extra, name],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _wait_http(url: str, context: ssl.SSLContext | None, container: str, podman: Podman, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urlopen(url, timeout=2) if context is None else urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError) as e:
            last = e
        state = podman("inspect", "--format", "{{.State.Status}}", container).strip()
        if state != "running":
            break
        time.sleep(0.2)
    logs = podman("logs", container)
    raise AssertionError(f"{url} never answered 200 ({last}); container {container}:\n{logs[-4000:]}")


def _logged_ports(container: str, podman: Podman, timeout: float = 90) -> dict[str, int]:
    """The ports the server in ``container`` logged it listens on (testbed.ports)."""
    deadline = time.monotonic() + timeout
    while True:
        ports = listening_ports(podman("logs", container))
        if {"dns", "webhook", "ops"} <= ports.keys():
            return ports
        state = podman("inspect", "--format", "{{.State.Status}}", container).strip()
        if state != "running" or time.monotonic() > deadline:
            raise AssertionError(f"container {container} ({state}) did not log its ports:\n"
                                 f"{podman('logs', container)[-4000:]}")
        time.sleep(0.2)


@pytest.fixture
def running(built: Built, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The pulled image started as the chart starts it (module docstring), serving two networks
    from a pods file, forwarding to a dnsmasq; yields the ports, addresses and CA."""
    net_a, net_b = network_id("image-a"), network_id("image-b")
    pods = [kubedock_pod("db", [net_a], ip="127.88.1.1", uid="a-db"),
            kubedock_pod("app", [net_a], ip="127.88.1.2", uid="a-app"),
            kubedock_pod("db", [net_b], ip="127.88.2.1", uid="b-db")]
    data = tmp_path / "data"
    tls = tmp_path / "tls"
    data.mkdir()
    generated = generate_ca_and_cert(["127.0.0.1"], tls)
    (data / "pods.json").write_text(json.dumps(pods))
    # As the chart's Secret volume: readable by the pod's group (fsGroup 10001), mode 0440.
    for path in (generated.cert_path, generated.key_path, data / "pods.json"):
        os.chown(path, 0, UID)
        path.chmod(0o440)
    for directory in (tls, data, tmp_path):
        os.chown(directory, 0, UID)
        directory.chmod(0o750)
    name = f"kubedock-dns-test-{secrets.token_hex(4)}"
    with Dnsmasq("127.0.0.1", namespace="tests") as upstream:
        built.podman(
            "run", "--detach", "--name", name, "--network", "host",
            "--user", f"{UID}:{UID}", "--read-only", "--read-only-tmpfs=false",
            "--tmpfs", "/tmp:rw,size=16m,mode=1777", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--volume", f"{tls}:/etc/kubedock-dns/tls:ro", "--volume", f"{data}:/data:ro",
            built.ref,
            "--pods-file=/data/pods.json",
            "--dns-port=0", "--dns-interface=127.0.0.1", f"--upstream={upstream.upstream_arg}",
            "--webhook-port=0", "--webhook-interface=127.0.0.1",
            f"--tls-cert=/etc/kubedock-dns/tls/{generated.cert_path.name}",
            f"--tls-key=/etc/kubedock-dns/tls/{generated.key_path.name}",
            "--dns-service-ip=10.96.0.53",
            "--ops-port=0", "--ops-interface=127.0.0.1",
        )
        try:
            # Port 0 for each listener (host network): the server logs what the kernel gave it.
            ports = _logged_ports(name, built.podman)
            dns_port, webhook_port, ops_port = ports["dns"], ports["webhook"], ports["ops"]
            context = ssl.create_default_context(cadata=generated.ca_pem.decode())
            _wait_http(f"http://127.0.0.1:{ops_port}/readyz", None, name, built.podman)
            _wait_http(f"https://127.0.0.1:{webhook_port}/healthz", context, name, built.podman)
            yield {"name": name, "dns": dns_port, "webhook": webhook_port, "ops": ops_port,
                   "context": context, "upstream": upstream}
        finally:
            logs = subprocess.run(built.podman.command("logs", name), capture_output=True, text=True,
                                  env=built.podman.env, timeout=60)
            built.podman.remove_containers([name])
            print(f"--- logs of {name}\n{(logs.stdout + logs.stderr)[-3000:]}")


def test_runs_as_uid_10001_on_a_read_only_root(built: Built, running: dict[str, Any]) -> None:
    """Inside the running container the server is uid 10001 and the root filesystem refuses
    writes (only the /tmp the chart mounts is writable)."""
    name = running["name"]
    assert built.podman("exec", name, "python", "-c", "import os; print(os.getuid(), os.getgid())").split() == [str(UID), str(UID)]
    denied = subprocess.run(built.podman.command("exec", name, "python", "-c", "open('/opt/x', 'w')"),
                            capture_output=True, text=True, env=built.podman.env, timeout=60)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    built.podman("exec", name, "python", "-c", "open('/tmp/x', 'w').write('ok')")


def test_serves_dns_by_the_askers_network_and_forwards_the_rest(running: dict[str, Any]) -> None:
    """``dig`` from a pod's address gets ``db`` of that pod's network (each network its own),
    and a cluster name is forwarded to the upstream and answered from there."""
    port = running["dns"]
    assert _dig(port, "127.88.1.2", "db", "+short").split() == ["127.88.1.1"]
    assert _dig(port, "127.88.2.1", "db", "+short").split() == ["127.88.2.1"]
    upstream: Dnsmasq = running["upstream"]
    assert _dig(port, "127.88.1.2", upstream.kubernetes_name, "+short").split() == [upstream.kubernetes_ip]
    assert re.search(r"status: NOERROR", _dig(port, "127.88.1.2", "db", "+tcp"))


def test_serves_the_webhook_over_tls(running: dict[str, Any]) -> None:
    """The webhook answers over TLS with the mounted certificate: an opted-in pod's
    AdmissionReview comes back allowed, patched to use the configured nameserver."""
    pod = kubedock_pod("new", [network_id("image-a")], namespace="tests")
    pod.pop("status", None)
    review = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "image-test", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "operation": "CREATE", "namespace": "tests", "object": pod},
    }
    request = urllib.request.Request(f"https://127.0.0.1:{running['webhook']}/mutate",
                                     data=json.dumps(review).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10, context=running["context"]) as response:
        answer = json.load(response)["response"]
    assert answer["uid"] == "image-test" and answer["allowed"] is True
    patch = json.loads(base64.b64decode(answer["patch"]))
    assert {"op": "add", "path": "/spec/dnsPolicy", "value": "None"} in patch
    config = [op["value"] for op in patch if op["path"] == "/spec/dnsConfig"]
    assert config and config[0]["nameservers"] == ["10.96.0.53"]


def test_serves_readiness_and_metrics(running: dict[str, Any]) -> None:
    """The ops endpoint says ready (the pods file is loaded) and its metrics count the pods."""
    with urlopen(f"http://127.0.0.1:{running['ops']}/readyz", timeout=5) as r:
        assert r.status == 200
    with urlopen(f"http://127.0.0.1:{running['ops']}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert re.search(r"^kubedock_dns_pods 3(\.0)?$", metrics, re.M), metrics[:2000]


def test_stopping_the_container_drains_then_exits_0(built: Built, running: dict[str, Any]) -> None:
    """``podman stop`` sends SIGTERM to twistd, PID 1 of the container, as the kubelet does when it
    deletes a pod: /readyz turns 503 at once while DNS still answers, and after the drain the
    container exits 0 by itself (not killed by its signal, nor by the SIGKILL 30 s later)."""
    name, ops = running["name"], f"http://127.0.0.1:{running['ops']}/readyz"
    stopping = subprocess.Popen(built.podman.command("stop", "--time", "30", name), env=built.podman.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        status = 200
        while status == 200 and time.monotonic() < deadline:
            try:
                with urlopen(ops, timeout=2) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            time.sleep(0.1)
        assert status == 503, "still ready 5 s after SIGTERM"
        assert _dig(running["dns"], "127.88.1.2", "db", "+short").split() == ["127.88.1.1"]
        began = time.monotonic()
        assert stopping.wait(timeout=60) == 0, stopping.stderr.read() if stopping.stderr else ""
        assert time.monotonic() - began < 25, "the container needed SIGKILL"
    finally:
        if stopping.poll() is None:
            stopping.kill()
            stopping.wait()
    assert built.podman("inspect", "--format", "{{.State.ExitCode}}", name).strip() == "0"
    logs = built.podman("logs", name)
    assert "draining for 5 s before stopping" in logs and "drain over after" in logs, logs[-3000:]


def test_explain_and_networks_commands_run_inside_the_container(built: Built, running: dict[str, Any]) -> None:
    """``kubectl exec deploy/kubedock-dns -- kubedock-dns explain ...`` as documented: the console
    command is on the image's PATH and tells, from the running server, why a pod gets its db;
    ``kubedock-dns networks`` lists the two networks."""
    ops = f"http://127.0.0.1:{running['ops']}"
    story = built.podman("exec", running["name"], "kubedock-dns", "--ops", ops, "explain", "--from", "127.88.1.2", "db")
    assert "=> db.tests.svc.cluster.local: 127.88.1.1 (answered from network" in story, story
    table = built.podman("exec", running["name"], "kubedock-dns", "--ops", ops, "networks")
    assert table.startswith("NETWORK ID") and network_id("image-a")[:12] in table, table


def test_image_size_is_reported_in_the_docs(built: Built) -> None:
    """docs/install.md states the image's size and its application layer's (to the MB, within
    10%), so a change that bloats the image shows up here."""
    total = built.podman.image_size(built.ref)
    base = built.podman.image_size(debian_base(built.podman))
    text = INSTALL_DOC.read_text()
    found = re.search(r"kubedock-dns layer is about (\d+) MB", text)
    assert found, "docs/install.md should say 'the kubedock-dns layer is about N MB'"
    documented = int(found.group(1)) * 1_000_000
    layer = total - base
    assert abs(layer - documented) <= 0.1 * documented, f"layer is {layer / 1e6:.0f} MB, docs say {found.group(1)} MB"


def test_default_base_is_the_pinned_stock_python_image() -> None:
    """What users build: without a build argument both stages start from python:3.11-slim-bookworm
    pinned by digest (the tests only swap the base through PYTHON_IMAGE, never edit the Dockerfile)."""
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def test_image_carries_the_oci_labels_of_this_release(built: Built) -> None:
    """The image says what it is: org.opencontainers.image.* labels with this release's version
    (kubedock_dns.__version__), the licence, the project's source and the base it was built on
    (here the Debian stand-in passed as PYTHON_IMAGE)."""
    from kubedock_dns import __version__

    labels = json.loads(built.podman("image", "inspect", "--format", "{{json .Labels}}", built.ref))
    oci = {k.removeprefix("org.opencontainers.image."): v for k, v in labels.items()
           if k.startswith("org.opencontainers.image.")}
    assert oci["version"] == __version__ and oci["title"] == "kubedock-dns"
    assert oci["licenses"] == "Apache-2.0"
    assert oci["source"] == "https://github.com/kubedock-dns/kubedock-dns"
    assert oci["base.name"] == debian_base(built.podman)


def test_image_holds_exactly_the_locked_dependencies(built: Built) -> None:
    """The virtual environment holds the distributions of image-requirements.txt at their pinned
    versions and kubedock-dns itself, nothing more (pip and setuptools were removed after use)."""
    from packaging.utils import canonicalize_name

    from kubedock_dns import __version__
    from tests.test_release import LOCK, parse_lock

    probe = ("import importlib.metadata as m, json;"
             "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = built.podman("run", "--rm", "--network", "none", "--entrypoint", "python", built.ref, "-c", probe)
    installed = {canonicalize_name(name): version for name, version in json.loads(out).items()}
    locked = {name: entry[0] for name, entry in parse_lock(LOCK.read_text()).items()}
    assert installed == {**locked, "kubedock-dns": __version__}


def test_runs_under_a_platform_assigned_uid(built: Built) -> None:
    """With the chart's uid dropped (podSecurityContext.runAsUser=null on a platform that assigns
    one, e.g. OpenShift's uid 1000700000 with group 0), the image still starts twistd with its
    plugin on a read-only root: nothing in it belongs to uid 10001 alone."""
    out = built.podman("run", "--rm", "--network", "none", "--user", "1000700000:0", "--read-only",
                       built.ref, "--help")
    assert "--dns-port=" in out and "--webhook-port=" in out
    probe = "import os, kubedock_dns.tap; print(os.getuid())"
    assert built.podman("run", "--rm", "--network", "none", "--user", "1000700000:0", "--read-only",
                        "--entrypoint", "python", built.ref, "-c", probe).split() == ["1000700000"]



def test_test_pod_image_resolves_with_glibc_and_stops_on_sigterm(built: Built) -> None:
    """The small image offered for kubedock-like test pods (and as a pause image) comes back
    from the registry, has glibc's ``getent`` and ``python3``, and its command exits 0 on SIGTERM
    (as PID 1 it gets no default handler: a plain ``sleep`` would wait for SIGKILL)."""
    from testbed.image import test_pod_image

    ref = test_pod_image(built.podman, built.registry.address)
    repository, _, tag = ref.partition("/")[2].partition(":")
    assert tag in built.registry.tags(repository)
    built.podman("rmi", "--force", ref)
    built.podman("pull", "--tls-verify=false", ref)
    name = f"testpod-{secrets.token_hex(4)}"
    built.podman("run", "--detach", "--name", name, "--network", "none", ref)
    try:
        assert built.podman("exec", name, "getent", "hosts", "localhost").split()[0] in {"127.0.0.1", "::1"}
        assert built.podman("exec", name, "python3", "-c", "print(6 * 7)").strip() == "42"
        built.podman("stop", "--time", "60", name)
        assert built.podman("inspect", "--format", "{{.State.ExitCode}}", name).strip() == "0"
    finally:
        built.podman.remove_containers([name])
        built.podman("rmi", "--force", ref)


def test_registry_retries_on_another_port_when_its_port_was_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The registry cannot bind port 0, so a free port is picked; when another process takes it
    first, the real docker-registry fails with "address already in use" and the start is retried
    on another port, answering there.  Leaving the block stops it and removes its storage."""
    import socket

    from testbed.image import registry as registry_module

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picked: list[int] = []
    real_pick = registry_module._free_tcp_port

    def pick() -> int:
        picked.append(taken.getsockname()[1] if not picked else real_pick())
        return picked[-1]

    monkeypatch.setattr(registry_module, "_free_tcp_port", pick)
    try:
        with Registry(tmp_path) as registry:
            assert len(picked) == 2 and registry.port == picked[1] != picked[0]
            assert "address already in use" not in registry.log_tail()  # the log of the retry
            with urlopen(f"{registry.url}/v2/", timeout=5) as response:
                assert response.status == 200
            storage = registry._dir
        assert storage is not None and not storage.exists()
    finally:
        taken.close()


def test_registry_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A registry that exits at once is reported with its own output, not as a timeout."""
    from testbed.image import RegistryError

    fake = tmp_path / "registry"
    fake.write_text("#!/bin/sh\necho 'configuration error: no storage driver' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RegistryError, match="exited \\(1\\) on start:\n.*no storage driver"):
        with Registry(tmp_path, binary=str(fake)):
            pass
