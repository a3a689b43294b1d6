"""Real clients, the real kubedock, the real node (issue 22): what users run, seen from inside the pods.

Nothing here is a stand-in for the path a user's test takes: the real kubedock 0.22.0
(``../shared/kubedock/kubedock``; every test skips, saying so, without it) turns the clients'
Docker API calls into pods in one namespace of the real node (``testbed.node``), kubedock-dns from
this checkout serves that namespace (``testbed.node.hostserver``: its webhook mutates kubedock's
pods, pods reach its DNS through the Service kube-proxy programs), and the clients are the real
ones, built by ``scripts/build-tools.sh`` into ``~/.cache/kubedock-dns``:

- Testcontainers-Java (``testbed/clients/java``, Maven): two sessions at once, each with
  ``Testcontainers.exposeHostPorts`` mapping its own HTTP server to the same container port, a
  ``db`` and an ``app`` with ``withAccessToHost(true)`` in a network of its own.  The sshd image is
  built here from Debian's openssh-server (``testbed.image.sshd``) and given to Testcontainers the
  way users give it, through its configuration (``sshd.container.image`` in
  ``~/.testcontainers.properties``), and to kubedock-dns with ``--testcontainers-sshd-image``;
- testcontainers-go (``testbed/clients/tcgo``, our program on the released module): two suites
  at once with the same alias ``db`` and ``Hostname: dbhost``, and ``HostAccessPorts`` (its sshd
  image name, ``testcontainers/sshd:1.4.0``, is the Debian-built one imported under that name:
  the node cannot pull from Docker Hub);
- Docker Compose 2.40 (built from the Go module proxy): two projects with the same services;
- two kubedock instances in one namespace, one Compose project of the same name on each.

Each test checks from inside the pods (glibc's ``getent`` in the container's namespaces, and
through the client's own exec, which kubedock runs via the API server's ``pods/exec``) what must
resolve, to which pod, and what must not.  The module shares one namespace, one kubedock-dns and
one kubedock; the node is the session's.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from testbed.controlplane import BUILD_TOOLS
from testbed.kubedock import Kubedock, KubedockUnavailable, find_kubedock
from testbed.node import images as node_images
from testbed.node.cluster import Node
from testbed.node.hostserver import HostKubedockDns

SESSION_ANNOTATION = "org.testcontainers.sessionId"
HOST_NAME = "host.testcontainers.internal"
TOOLBOX = node_images.TOOLBOX_IMAGE  # busybox sh, glibc getent; imported into the node (kubedock's init image)
IDLE = "trap 'exit 0' TERM; while :; do sleep 1; done"
TC_GO_SSHD = "docker.io/testcontainers/sshd:1.4.0"  # testcontainers-go's own, not configurable
CLIENT = "localhost/kubedock-dns-testbed/client:1"


def _kubedock_missing() -> str:
    try:
        find_kubedock()
    except KubedockUnavailable as e:
        return str(e)
    return ""


# Decided before any fixture: a machine without kubedock must not start a node to skip.
pytestmark = pytest.mark.skipif(bool(_kubedock_missing()), reason=_kubedock_missing())


@pytest.fixture(scope="module")
def kubedock_binary() -> str:
    return find_kubedock()


def build_tool(tool: str) -> str:
    """A client built (or found in the cache) by scripts/build-tools.sh."""
    done = subprocess.run(["bash", str(BUILD_TOOLS), tool], capture_output=True, text=True, timeout=3600,
                          check=False)
    assert done.returncode == 0, f"build-tools.sh {tool} failed:\n{done.stderr[-3000:]}"
    return done.stdout.split()[-1]


@pytest.fixture(scope="module")
def images(node: Node) -> dict[str, str]:
    """Imported into the node's containerd (no registry): ``sshd``, the Debian-built sshd image,
    also under testcontainers-go's own name; ``client``, the same Debian image under a name no
    sshd pattern matches, for the test containers (glibc's getent and python3: they connect by
    name as applications do; the toolbox's static busybox wget cannot resolve names)."""
    from testbed.image import Podman, PodmanUnavailable
    from testbed.image.sshd import docker_archive, sshd_image

    try:
        podman = Podman()
    except PodmanUnavailable as e:
        pytest.skip(f"no image builder here: {e}")
    assert node.containerd is not None
    sshd = sshd_image(podman)
    with tempfile.TemporaryDirectory(prefix="kubedock-dns-images-") as work:
        node.containerd.import_image(docker_archive(podman, sshd, Path(work) / "sshd.tar"))
    for alias in (TC_GO_SSHD, CLIENT):
        node.containerd.ctr("images", "tag", "--force", sshd, alias)
    return {"sshd": sshd, "client": CLIENT}


def fetch_command(url: str) -> list[str]:
    """An HTTP GET by name with glibc's resolver, as an application in the container does it."""
    return ["python3", "-c", "import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())", url]


class Bed:
    """The module's namespace, kubedock-dns and first kubedock."""

    def __init__(self, node: Node, namespace: str, server: HostKubedockDns, kubedock: Kubedock) -> None:
        self.node, self.namespace, self.server, self.kubedock = node, namespace, server, kubedock

    def pods(self) -> list[dict[str, Any]]:
        data = self.node.core.list_namespaced_pod(self.namespace, label_selector="kubedock=true",
                                                  _preload_content=False).data
        return [p for p in json.loads(data)["items"] if not p["metadata"].get("deletionTimestamp")]

    def pod_of(self, container_id: str) -> dict[str, Any]:
        """The pod kubedock made for a container (its label ``kubedock.containerid``)."""
        found = [p for p in self.pods() if p["metadata"]["labels"].get("kubedock.containerid") == container_id[:12]]
        assert len(found) == 1, f"container {container_id}: pods {[p['metadata']['name'] for p in found]}"
        return found[0]

    def getent(self, pod: dict[str, Any], name: str) -> tuple[int, list[str]]:
        """glibc's lookup of ``name`` inside the pod: exit status and addresses."""
        done = self.node.exec(self.namespace, pod["metadata"]["name"], ["getent", "hosts", name], timeout=30)
        return done.returncode, [line.split()[0] for line in done.stdout.splitlines() if line.strip()]

    def expect(self, pod: dict[str, Any], name: str, address: str | None, problems: list[str]) -> None:
        """``name`` resolves to exactly ``address`` in ``pod`` (None: is not found, exit 2)."""
        rc, found = self.getent(pod, name)
        want = (2, []) if address is None else (0, [address])
        if (rc, found) != want:
            problems.append(f"{pod['metadata']['name']}: getent hosts {name} -> {rc} {found}, expected {want}")

    def context(self) -> str:
        return (f"kubedock-dns log:\n{self.server.log(30)}\nkubedock log:\n{self.kubedock.log(30)}")


@pytest.fixture(scope="module")
def bed(node: Node, kubedock_binary: str, images: dict[str, str]) -> Iterator[Bed]:
    """A namespace served by kubedock-dns (its webhook and DNS) and kubedock beside it, started
    as the README says; kubedock's ``bridge`` network is given to ``--unresolved-network``."""
    namespace = node.create_namespace("clients")
    try:
        with Kubedock(node, namespace, init_image=TOOLBOX, binary=kubedock_binary) as kubedock:
            assert kubedock.bridge_network, f"kubedock lists no bridge network: {kubedock.get('/networks')}"
            args = ("--unresolved-network", kubedock.bridge_network,
                    "--testcontainers-sshd-image", images["sshd"].rpartition(":")[0],
                    "--testcontainers-sshd-image", "testcontainers/sshd")
            with HostKubedockDns(node, namespace, args) as server:
                yield Bed(node, namespace, server, kubedock)
    finally:
        node.delete_namespace(namespace)


def client_env(bed_or_host: Bed | str, home: Path) -> dict[str, str]:
    """What a user sets to run Testcontainers or Compose against kubedock, with a home of its own."""
    docker_host = bed_or_host if isinstance(bed_or_host, str) else bed_or_host.kubedock.docker_host
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("DOCKER_")}
    env.update(HOME=str(home), DOCKER_HOST=docker_host, TESTCONTAINERS_RYUK_DISABLED="true",
               TESTCONTAINERS_CHECKS_DISABLE="true")
    return env


class Client:
    """A client process that prints one JSON line, then waits for a line on its input to finish."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log_file, text=True, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put("")

    def report(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no report within {timeout:.0f}s; log:\n{self.tail()}") from None
            if line.startswith("{"):
                return dict(json.loads(line))
            if line == "":
                raise AssertionError(f"exited {self.process.wait()} without a report; log:\n{self.tail()}")

    def finish(self, timeout: float = 120) -> int:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.process.stdin is not None
            self.process.stdin.write("done\n")
            self.process.stdin.close()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)
        finally:
            self._log_file.close()

    def tail(self, lines: int = 40) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def token_server(token: str) -> Iterator[int]:
    """An HTTP server on a loopback port of this machine answering ``token``; yields the port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            body = token.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def session_pods(bed: Bed, session: str) -> list[dict[str, Any]]:
    return [p for p in bed.pods() if p["metadata"].get("annotations", {}).get(SESSION_ANNOTATION) == session]


def networks_of(pod: dict[str, Any]) -> set[str]:
    return {v for k, v in pod["metadata"]["annotations"].items() if k.startswith("kubedock.network/")}


def sshd_pod(bed: Bed, session: str, image: str, network: str | None = None) -> dict[str, Any]:
    """The session's sshd pod: its container runs ``image`` (and it is on ``network``)."""
    found = [p for p in session_pods(bed, session) if p["spec"]["containers"][0]["image"] == image
             and (network is None or network in networks_of(p))]
    assert len(found) == 1, f"session {session}: sshd pods {[p['metadata']['name'] for p in found]}"
    return found[0]


def ip(pod: dict[str, Any]) -> str:
    return str(pod["status"]["podIP"])


def container_name(pod: dict[str, Any]) -> str | None:
    """The Docker container name kubedock annotated (None when the client gave none)."""
    name = pod["metadata"].get("annotations", {}).get("kubedock.containername")
    return name.lstrip("/") if name else None


def test_testcontainers_java_sessions_reach_their_own_host_port_in_parallel(bed: Bed, images: dict[str, str],
                                                                             tmp_path: Path) -> None:
    """Two Testcontainers-Java sessions at once, both exposing their host's HTTP server as the
    same container port 8080 with the same network aliases: each app container, and each
    session's container on no network of its own (kubedock's bridge, unresolved here), fetches its
    own session's token from http://host.testcontainers.internal:8080 (never the other's); inside
    each app host.testcontainers.internal is its own session's sshd pod and db its own db, while
    the other session's containers are not found by name."""
    java = build_tool("testcontainers-java")
    sessions = {}
    for tag in ("one", "two"):
        home = tmp_path / tag
        home.mkdir()
        # Testcontainers' own configuration file, where users set the sshd image.
        (home / ".testcontainers.properties").write_text(f"sshd.container.image={images['sshd']}\n")
        env = client_env(bed, home)
        env["JAVA_OPTIONS"] = f"-Duser.home={home}"
        token = f"{tag}-{secrets.token_hex(8)}"
        sessions[tag] = (token, Client([java, images["client"], token, "8080"], env, tmp_path / f"java-{tag}.log"))
    try:
        reports = {tag: client.report(timeout=300) for tag, (_, client) in sessions.items()}
        problems: list[str] = []
        for tag, report in reports.items():
            token, client = sessions[tag]
            other = reports["two" if tag == "one" else "one"]
            assert report["fetch_exit"] == 0, f"{tag}: {report}\n{client.tail()}\n{bed.context()}"
            assert report["fetched"].strip() == token, f"{tag} fetched {report['fetched']!r}, not {token!r}"
            assert report["loner_fetched"].strip() == token, f"{tag}'s loner: {report}\n{bed.context()}"
            own_sshd = sshd_pod(bed, report["session"], images["sshd"])
            app, db = bed.pod_of(report["app_id"]), bed.pod_of(report["db_id"])
            other_db = bed.pod_of(other["db_id"])
            # What Testcontainers' execInContainer saw (kubedock: pods/exec through the API server)...
            assert report["host"].split()[:1] == [ip(own_sshd)], report
            assert report["db"].split()[:1] == [ip(db)], report
            # ... and what glibc sees inside the app's pod.
            bed.expect(app, HOST_NAME, ip(own_sshd), problems)
            bed.expect(bed.pod_of(report["loner_id"]), HOST_NAME, ip(own_sshd), problems)
            bed.expect(app, "db", ip(db), problems)
            bed.expect(app, db["metadata"]["labels"]["kubedock.containerid"], ip(db), problems)
            bed.expect(app, other_db["metadata"]["labels"]["kubedock.containerid"], None, problems)
            for pod, address in ((db, ip(db)), (other_db, None)):
                name = container_name(pod)
                if name:
                    bed.expect(app, name, address, problems)
        assert problems == [], "\n".join(problems) + "\n" + bed.context()
        explained = subprocess.run(
            [sys.executable, "-m", "kubedock_dns", "--ops", f"http://127.0.0.1:{bed.server.ops_port}", "explain",
             "--from", f"{bed.namespace}/{bed.pod_of(reports['one']['app_id'])['metadata']['name']}", HOST_NAME],
            capture_output=True, text=True, timeout=60, check=False)
        assert explained.returncode == 0, explained.stderr
        assert f"Testcontainers session {reports['one']['session']}" in explained.stdout, explained.stdout
    finally:
        codes = {tag: client.finish() for tag, (_, client) in sessions.items()}
    assert codes == {"one": 0, "two": 0}, {tag: client.tail() for tag, (_, client) in sessions.items()}


def test_testcontainers_go_suites_see_their_own_hostname_alias_and_host(bed: Bed, images: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """Two testcontainers-go suites at once (two packages of one ``go test`` run: testcontainers-go
    derives its session from the parent process, so they share one session), each a db with alias
    db and Hostname dbhost and an app with HostAccessPorts (an sshd of its own, aliased
    host.testcontainers.internal in the app's network): in each app, db, dbhost and its own db's
    container name resolve to its own db pod and host.testcontainers.internal to its own sshd
    (which reaches its own host port), never the other suite's; the other suite's container
    names are not found."""
    tcgo = build_tool("testcontainers-go")
    suites = {}
    with contextlib.ExitStack() as stack:
        for tag in ("a", "b"):
            token = f"go-{tag}-{secrets.token_hex(8)}"
            port = stack.enter_context(token_server(token))
            home = tmp_path / tag
            home.mkdir()
            suites[tag] = (token, port, Client([tcgo, images["client"], f"{tag}-{secrets.token_hex(3)}", str(port)],
                                               client_env(bed, home), tmp_path / f"tcgo-{tag}.log"))
        try:
            reports = {tag: suite[2].report(timeout=300) for tag, suite in suites.items()}
            assert reports["a"]["session"] == reports["b"]["session"], reports  # one parent process
            problems: list[str] = []
            for tag, report in reports.items():
                token, port, client = suites[tag]
                other = reports["b" if tag == "a" else "a"]
                app, db = bed.pod_of(report["app_id"]), bed.pod_of(report["db_id"])
                own_sshd = sshd_pod(bed, report["session"], TC_GO_SSHD.removeprefix("docker.io/"), report["network"])
                assert report["exec db"].split()[:2] == ["0", ip(db)], f"{report}\n{client.tail()}"
                assert report["exec dbhost"].split()[:2] == ["0", ip(db)], report
                for name in ("db", "dbhost", container_name(db)):
                    bed.expect(app, str(name), ip(db), problems)
                bed.expect(app, HOST_NAME, ip(own_sshd), problems)
                for other_id in (other["db_id"], other["app_id"]):
                    other_pod = bed.pod_of(other_id)
                    bed.expect(app, str(container_name(other_pod)), None, problems)
                fetched = bed.node.exec(bed.namespace, app["metadata"]["name"], fetch_command(f"http://{HOST_NAME}:{port}/"))
                if fetched.stdout.strip() != token:
                    problems.append(f"{tag}: fetched {fetched.stdout!r} {fetched.stderr!r}, not {token!r}")
            assert problems == [], "\n".join(problems) + "\n" + bed.context()
        finally:
            codes = {tag: suite[2].finish() for tag, suite in suites.items()}
    assert codes == {"a": 0, "b": 0}, {tag: suite[2].tail() for tag, suite in suites.items()}


COMPOSE_FILE = f"""\
services:
  db:
    image: {TOOLBOX}
    entrypoint: ["/bin/sh", "-c", "{IDLE}"]
  app:
    image: {TOOLBOX}
    entrypoint: ["/bin/sh", "-c", "{IDLE}"]
"""


class Compose:
    """``docker-compose -p <project>`` with the module's compose file against one kubedock."""

    def __init__(self, binary: str, directory: Path, docker_host: str) -> None:
        self.binary, self.directory = binary, directory
        (directory / "compose.yaml").write_text(COMPOSE_FILE)
        home = directory / "home"
        home.mkdir(exist_ok=True)
        self.env = client_env(docker_host, home)

    def __call__(self, project: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, "-p", project, "-f", str(self.directory / "compose.yaml"), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env, check=False)

    def up(self, project: str) -> None:
        done = self(project, "up", "-d")
        assert done.returncode == 0, f"compose -p {project} up: {done.stdout}{done.stderr}"

    def container_id(self, project: str, service: str) -> str:
        done = self(project, "ps", "-q", service)
        assert done.returncode == 0 and done.stdout.strip(), f"{done.stdout}{done.stderr}"
        return done.stdout.split()[0]

    def down(self, project: str) -> None:
        done = self(project, "down", "--timeout", "1")
        assert done.returncode == 0, f"compose -p {project} down: {done.stdout}{done.stderr}"


def test_compose_projects_resolve_their_own_services_only(bed: Bed, tmp_path: Path) -> None:
    """Two Compose projects with the same services on one kubedock: in each, db and <project>-db-1
    resolve to its own db (also through ``docker-compose exec``, which kubedock runs via
    pods/exec); the other project's container names are not found."""
    compose = Compose(build_tool("compose"), tmp_path, bed.kubedock.docker_host)
    projects = [f"c{i}{secrets.token_hex(2)}" for i in (1, 2)]
    try:
        for project in projects:
            compose.up(project)
        problems: list[str] = []
        for project, other in (projects, projects[::-1]):
            app, db = (bed.pod_of(compose.container_id(project, s)) for s in ("app", "db"))
            for name in ("db", f"{project}-db-1"):
                bed.expect(app, name, ip(db), problems)
            for name in (f"{other}-db-1", f"{other}-app-1"):
                bed.expect(app, name, None, problems)
        assert problems == [], "\n".join(problems) + "\n" + bed.context()
        through = compose(projects[0], "exec", "-T", "app", "getent", "hosts", "db")
        assert through.returncode == 0, through.stdout + through.stderr
        assert through.stdout.split()[:1] == [ip(bed.pod_of(compose.container_id(projects[0], "db")))]
    finally:
        for project in projects:
            compose.down(project)


def test_two_kubedock_instances_in_one_namespace_see_only_their_own(bed: Bed, kubedock_binary: str,
                                                                     tmp_path: Path) -> None:
    """A second kubedock in the same namespace (one per CI job, as kubedock's Tekton example runs
    it): the same Compose project on both makes the same network name and the same container
    names, under different network IDs; each instance's app resolves db and <project>-db-1 to
    its own instance's db only."""
    binary = build_tool("compose")
    project = f"same{secrets.token_hex(2)}"
    with Kubedock(bed.node, bed.namespace, init_image=TOOLBOX, binary=kubedock_binary,
                  name="kubedock-second") as second:
        first_dir, second_dir = tmp_path / "first", tmp_path / "second"
        first_dir.mkdir(), second_dir.mkdir()
        instances = [Compose(binary, first_dir, bed.kubedock.docker_host), Compose(binary, second_dir, second.docker_host)]
        try:
            for compose in instances:
                compose.up(project)
            pods = [{s: bed.pod_of(compose.container_id(project, s)) for s in ("app", "db")} for compose in instances]
            networks = [p["db"]["metadata"]["annotations"]["kubedock.network/0"] for p in pods]
            assert networks[0] != networks[1], "two kubedock instances gave one network ID"
            problems: list[str] = []
            for own in pods:
                for name in ("db", f"{project}-db-1"):
                    bed.expect(own["app"], name, ip(own["db"]), problems)
            assert problems == [], "\n".join(problems) + "\n" + bed.context() + "\n" + second.log(20)
        finally:
            for compose in instances:
                compose.down(project)
