"""A real Kubernetes control plane, etcd plus kube-apiserver, on loopback for tests and the demo.

Contract:

- ``ControlPlane().start()`` (or ``with ControlPlane() as cp:``) starts etcd and kube-apiserver on
  127.0.0.1, on free ports, in a fresh temporary directory, and returns once ``/readyz`` answers 200.
  Progress goes to stderr; a failure raises :class:`ControlPlaneError` whose message carries the
  tail of the failing process's log.
- The API server serves TLS with a certificate signed by a throw-away CA (``ca_path``), accepts one
  static bearer token (``token``) for user ``admin`` in group ``system:masters``, authorises with
  RBAC, allocates Service IPs from ``service_cidr``, and runs the Mutating and Validating admission
  webhook plugins.  There is no controller manager, scheduler or kubelet: tests play the kubelet by
  writing pod status themselves.  The ``ServiceAccount`` admission plugin is off, since no
  controller creates the ``default`` service account.
- ``kubeconfig_path`` names a kubeconfig (token auth, CA data inline) usable by any client.
- For a real node (:mod:`testbed.node`), ``advertise_address`` (an address of this machine that pods
  can reach) makes the API server listen on all addresses, advertise that one as the endpoint of
  the ``kubernetes`` Service (lease reconciler) and put it in its certificate; ``service_accounts``
  turns the ``ServiceAccount`` admission plugin on (a controller manager then creates the
  ``default`` accounts and the kubelet mounts their tokens), with ``service_account_key_path`` the
  key the controller manager signs with.
- ``restart_apiserver()`` stops and starts only kube-apiserver, on the same port with the same
  etcd, so stored objects survive and clients see a real outage (``stop_apiserver()`` and
  ``start_apiserver()`` hold it open).  The restarted server's watch cache starts afresh, so a
  watch from a resourceVersion older than the restart gets an ERROR event with code 410;
  ``compact_etcd()`` expires old revisions in etcd itself as well.
- ``stop()`` is idempotent; it kills each process's whole process group and removes every
  temporary directory.  Planes still running at interpreter exit are stopped by ``atexit``, and the
  processes die with the starting thread if the interpreter is killed (``setpriv --pdeathsig``).

Binaries come from the environment variables ``KUBE_APISERVER`` and ``ETCD`` when set; otherwise
etcd is the one on PATH (Debian's ``etcd-server``) and everything else comes from
``scripts/build-tools.sh`` (which prints cached paths at once and builds only when the cache under
``~/.cache/kubedock-dns/`` is empty).  :class:`BinariesUnavailable` means they cannot be had
at all (no Go toolchain and nothing cached): tests skip on it and fail on anything else.
"""

from __future__ import annotations

import atexit
import base64
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "Binaries",
    "BinariesUnavailable",
    "ControlPlane",
    "ControlPlaneError",
    "find_binaries",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_TOOLS = REPO_ROOT / "scripts" / "build-tools.sh"
LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or operated; the message says which process and why."""


class BinariesUnavailable(ControlPlaneError):
    """etcd or kube-apiserver cannot be obtained here (not set, not cached, and no Go to build it)."""


def _stderr_progress(message: str) -> None:
    print(f"controlplane: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Binaries


@dataclass(frozen=True)
class Binaries:
    """Paths of the two executables the control plane runs."""

    kube_apiserver: str
    etcd: str

    def __post_init__(self) -> None:
        for name, path in (("kube-apiserver", self.kube_apiserver), ("etcd", self.etcd)):
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise BinariesUnavailable(f"{name} binary {path!r} does not exist or is not executable")


def _cache_dir() -> Path:
    return Path(os.environ.get("KUBEDOCK_DNS_CACHE") or Path.home() / ".cache" / "kubedock-dns")


def _build_tool(tool: str, progress: Callable[[str], None], timeout: float) -> str:
    """Run ``scripts/build-tools.sh TOOL`` and return the path it prints."""
    if not BUILD_TOOLS.is_file():
        raise BinariesUnavailable(f"{BUILD_TOOLS} is missing; set the environment variable for {tool}")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # The script serialises builds itself (flock on the cache's .build-tools.lock).
    progress(f"locating {tool} with {BUILD_TOOLS.name} (a cold build takes many minutes)")
    try:
        done = subprocess.run(
            ["bash", str(BUILD_TOOLS), tool],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,  # build progress goes straight to our stderr
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ControlPlaneError(f"building {tool} took longer than {timeout:.0f}s") from e
    if done.returncode != 0:
        if shutil.which("go") is None:
            raise BinariesUnavailable(
                f"{tool} is not cached in {cache} and Go is not installed to build it "
                f"(install Go, or set {tool.upper().replace('-', '_')} to a binary)"
            )
        raise ControlPlaneError(f"{BUILD_TOOLS} {tool} failed with exit status {done.returncode}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise ControlPlaneError(f"{BUILD_TOOLS} {tool} printed no path")
    return lines[-1]


def find_binaries(
    progress: Callable[[str], None] = _stderr_progress, build_timeout: float = 3600.0
) -> Binaries:
    """Locate kube-apiserver and etcd.

    kube-apiserver: ``$KUBE_APISERVER``, else ``scripts/build-tools.sh kube-apiserver``.
    etcd: ``$ETCD``, else the ``etcd`` on PATH (Debian's ``etcd-server`` 3.4 serves
    kube-apiserver 1.36 for everything the tests use; only the RequestWatchProgress optimisation is
    off), else ``scripts/build-tools.sh etcd`` (etcd 3.6 built from source).
    """
    apiserver = os.environ.get("KUBE_APISERVER") or _build_tool("kube-apiserver", progress, build_timeout)
    etcd = os.environ.get("ETCD") or shutil.which("etcd") or _build_tool("etcd", progress, build_timeout)
    return Binaries(kube_apiserver=apiserver, etcd=etcd)


_help_cache: dict[str, str] = {}


def _etcd_help(path: str) -> str:
    if path not in _help_cache:
        out = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=30, check=False
        )
        _help_cache[path] = out.stdout + out.stderr
    return _help_cache[path]


def _version_of(path: str) -> str:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return "unknown version"
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "unknown version"


# --------------------------------------------------------------------------------------------
# Small helpers


def _free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the kernel picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def _no_proxy_opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]  # loopback only, never via a proxy
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.setdefault("GOMAXPROCS", str(min(os.cpu_count() or 2, 4)))
    return env


_SETPRIV = shutil.which("setpriv")


class ManagedProcess:
    """One child in its own process group, output to a log file, killed as a group."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = self.argv
        if _SETPRIV and threading.current_thread() is threading.main_thread():
            # Dies with us even if we are SIGKILLed (tied to the forking thread: main only).
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} starting {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_child_env(),
                cwd=self.cwd,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_status(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; reap the leader."""
        p = self.popen
        if p is None:
            return
        pgid = p.pid  # start_new_session: the child leads its own group
        steps = [(signal.SIGTERM, grace)] if grace > 0 else []
        for sig, wait in [*steps, (signal.SIGKILL, 10.0)]:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Whatever the leader left behind in its group goes too.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.popen = None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def failure(self, what: str) -> ControlPlaneError:
        status = self.exit_status()
        state = "still running" if status is None else f"exited with status {status}"
        return ControlPlaneError(
            f"{self.name} {what} ({state}); last lines of {self.log_path}:\n{self.tail()}"
        )


# --------------------------------------------------------------------------------------------
# Certificates and keys


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@dataclass(frozen=True)
class _Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path


def _make_pki(directory: Path, service_ip: str, extra_ips: Sequence[str] = ()) -> _Pki:
    """A CA, a serving certificate for loopback and the in-cluster names, and the SA signing key."""
    from testbed.tls import generate_ca_and_cert

    directory.mkdir(mode=0o700)
    hosts = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local", LOOPBACK, "::1", service_ip, *extra_ips]
    tls = generate_ca_and_cert(hosts, directory, common_name="kube-apiserver")
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = serialization.Encoding.PEM
    return _Pki(
        ca_cert=tls.ca_cert_path,
        serving_cert=tls.cert_path,
        serving_key=tls.key_path,
        sa_key=_write(directory / "sa.key", _pem_key(sa_key), 0o600),
        sa_pub=_write(
            directory / "sa.pub",
            sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        ),
    )


# --------------------------------------------------------------------------------------------
# The control plane

_running: set["ControlPlane"] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        planes = list(_running)
    for plane in planes:
        plane.stop()


class ControlPlane:
    """etcd and kube-apiserver on loopback; see the module docstring for the full contract.

    Attributes valid after :meth:`start`: ``url``, ``token``, ``ca_path``, ``kubeconfig_path``,
    ``etcd_url``, ``base_dir`` (logs: ``etcd.log``, ``kube-apiserver.log``).
    """

    def __init__(
        self,
        binaries: Binaries | None = None,
        *,
        service_cidr: str = "10.96.0.0/16",
        apiserver_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        progress: Callable[[str], None] | None = _stderr_progress,
        advertise_address: str | None = None,
        service_accounts: bool = False,
        temp_tag: str = "",
    ) -> None:
        net = ipaddress.ip_network(service_cidr)
        self.advertise_address = advertise_address
        self.service_accounts = service_accounts
        # In the temporary directories' names, so an owner killed outright can find them again.
        self._temp_tag = f"{temp_tag}-" if temp_tag else ""
        self.service_cidr = str(net)
        self.service_ip = str(next(net.hosts()))
        self._binaries = binaries
        self._extra_args = list(apiserver_args)
        self._timeout = startup_timeout
        self._progress = progress or (lambda message: None)
        self.token = secrets.token_urlsafe(32)
        self.base_dir: Path | None = None
        self._etcd_dir: Path | None = None
        self.url = ""
        self.etcd_url = ""
        self.ca_path = Path()
        self.kubeconfig_path = Path()
        self._etcd: ManagedProcess | None = None
        self._apiserver: ManagedProcess | None = None
        self._pki: _Pki | None = None
        self._apiserver_port = 0

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        """Start etcd, then kube-apiserver; return when ``/readyz`` is 200.  Cleans up on failure."""
        if self._etcd is not None:
            raise ControlPlaneError("this control plane is already started")
        began = time.monotonic()
        with _running_lock:
            _running.add(self)
        try:
            if self._binaries is None:
                self._binaries = find_binaries(self._progress)
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"kubedock-dns-cp-{self._temp_tag}"))
            self._etcd_dir = self._etcd_data_parent()
            extra_ips = [self.advertise_address] if self.advertise_address else []
            self._pki = _make_pki(self.base_dir / "pki", self.service_ip, extra_ips)
            self.ca_path = self._pki.ca_cert
            _write(self.base_dir / "tokens.csv", f"{self.token},admin,admin,system:masters\n".encode(), 0o600)
            self._start_etcd()
            self._start_apiserver(new_port=True)
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        self._progress(f"ready at {self.url} in {time.monotonic() - began:.1f}s (kubeconfig {self.kubeconfig_path})")
        return self

    def stop(self) -> None:
        """Kill kube-apiserver and etcd (whole process groups) and remove the temporary dirs."""
        for proc in (self._apiserver, self._etcd):
            if proc is not None:
                proc.stop(grace=5.0)
        self._apiserver = self._etcd = None
        for d in (self._etcd_dir, self.base_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self._etcd_dir = self.base_dir = None
        with _running_lock:
            _running.discard(self)

    def stop_apiserver(self, graceful: bool = True) -> None:
        """Stop kube-apiserver only (etcd and the stored objects stay): an API outage begins.

        ``graceful``: SIGTERM (open watches are ended by the server), SIGKILL after 5 s; otherwise
        SIGKILL at once, a crash (connections simply drop).
        """
        if self._apiserver is None:
            raise ControlPlaneError("the control plane is not started")
        self._progress(f"stopping kube-apiserver ({'graceful' if graceful else 'kill'})")
        self._apiserver.stop(grace=5.0 if graceful else 0.0)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again on the same port after :meth:`stop_apiserver`; wait for /readyz."""
        if self._apiserver is None:
            raise ControlPlaneError("the control plane is not started")
        if self._apiserver.alive():
            raise ControlPlaneError("kube-apiserver is already running")
        self._start_apiserver(new_port=False)

    def restart_apiserver(self, graceful: bool = True) -> None:
        """Stop and start kube-apiserver (same port, same etcd, same token and CA)."""
        began = time.monotonic()
        self.stop_apiserver(graceful)
        self.start_apiserver()
        self._progress(f"kube-apiserver restarted in {time.monotonic() - began:.1f}s")

    @property
    def apiserver_running(self) -> bool:
        """Whether the kube-apiserver process is alive (False between stop_ and start_apiserver)."""
        return self._apiserver is not None and self._apiserver.alive()

    @property
    def service_account_key_path(self) -> Path:
        """The private key service account tokens are signed with (for a controller manager)."""
        if self._pki is None:
            raise ControlPlaneError("the control plane is not started")
        return self._pki.sa_key

    @property
    def binaries(self) -> Binaries | None:
        """The binaries in use (None before start() when none were given)."""
        return self._binaries

    def pids(self) -> dict[str, int]:
        """Process ids of the running children by name ("etcd", "kube-apiserver")."""
        return {
            proc.name: proc.popen.pid
            for proc in (self._etcd, self._apiserver)
            if proc is not None and proc.popen is not None and proc.alive()
        }

    # -- clients -------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for this API server (caller closes it)."""
        from kubernetes import client  # not needed to run the control plane itself

        config = client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.ca_path)
        config.verify_ssl = True
        config.api_key = {"authorization": self.token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(config)

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts exactly this API server's CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision and return it; older resourceVersions become 410."""
        status = self._etcd_call("/v3/maintenance/status", {})
        revision = int(status["header"]["revision"])
        self._etcd_call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    # -- internals -----------------------------------------------------------------------

    def _etcd_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with _no_proxy_opener().open(request, timeout=10) as response:
            return json.loads(response.read())

    def _etcd_data_parent(self) -> Path:
        """etcd data on tmpfs when there is room: fsync is then free (etcd 3.4 lacks --unsafe-no-fsync)."""
        shm = Path("/dev/shm")
        try:
            if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30:
                return Path(tempfile.mkdtemp(prefix=f"kubedock-dns-etcd-{self._temp_tag}", dir=shm))
        except OSError:
            pass
        return Path(tempfile.mkdtemp(prefix=f"kubedock-dns-etcd-{self._temp_tag}"))

    def _start_etcd(self) -> None:
        assert self._binaries is not None and self.base_dir is not None and self._etcd_dir is not None
        etcd = self._binaries.etcd
        self._progress(f"starting etcd ({_version_of(etcd)}) from {etcd}")
        for attempt in range(3):
            client_port, peer_port = _free_port(), _free_port()
            client_url, peer_url = f"http://{LOOPBACK}:{client_port}", f"http://{LOOPBACK}:{peer_port}"
            data_dir = self._etcd_dir / f"data{attempt}"
            argv = [
                etcd,
                "--name=testbed",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=testbed={peer_url}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
            ]
            if "--unsafe-no-fsync" in _etcd_help(etcd):
                argv.append("--unsafe-no-fsync")
            proc = ManagedProcess("etcd", argv, self.base_dir / "etcd.log")
            self._etcd = proc
            self.etcd_url = client_url
            proc.start()
            if self._wait_ready(proc, f"{client_url}/health", None, lambda body: b'"health":"true"' in body):
                self._progress(f"etcd ready at {client_url}")
                return
            proc.stop()
            self._progress(f"etcd port clash, retrying (attempt {attempt + 2})")
        raise proc.failure("could not bind its ports")

    def _apiserver_argv(self) -> list[str]:
        assert self._binaries is not None and self.base_dir is not None and self._pki is not None
        pki = self._pki
        if self.advertise_address:
            # Pods reach the API server through the kubernetes Service, whose endpoint is this
            # address (kept by the lease reconciler).
            placement = ["--bind-address=0.0.0.0", f"--advertise-address={self.advertise_address}",
                         "--endpoint-reconciler-type=lease"]
        else:
            # The loopback advertise address may not be an endpoint of the kubernetes Service.
            placement = [f"--bind-address={LOOPBACK}", f"--advertise-address={LOOPBACK}",
                         "--endpoint-reconciler-type=none"]
        plugins = "NamespaceLifecycle,LimitRanger,DefaultTolerationSeconds,MutatingAdmissionWebhook," \
                  "ValidatingAdmissionWebhook,ResourceQuota"
        if self.service_accounts:
            admission = [f"--enable-admission-plugins={plugins},ServiceAccount"]
        else:
            admission = [f"--enable-admission-plugins={plugins}", "--disable-admission-plugins=ServiceAccount"]
        return [
            self._binaries.kube_apiserver,
            f"--etcd-servers={self.etcd_url}",
            *placement,
            f"--secure-port={self._apiserver_port}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--token-auth-file={self.base_dir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            *admission,
            "--allow-privileged=true",
            "--profiling=false",
            *self._extra_args,
        ]

    def _start_apiserver(self, new_port: bool) -> None:
        assert self._binaries is not None and self.base_dir is not None
        apiserver = self._binaries.kube_apiserver
        self._progress(f"starting kube-apiserver ({_version_of(apiserver)}) from {apiserver}")
        context = self.ssl_context()
        for attempt in range(3 if new_port else 1):
            if new_port:
                self._apiserver_port = _free_port()
                self.url = f"https://{LOOPBACK}:{self._apiserver_port}"
            proc = ManagedProcess("kube-apiserver", self._apiserver_argv(), self.base_dir / "kube-apiserver.log")
            self._apiserver = proc
            proc.start()
            if self._wait_ready(proc, f"{self.url}/readyz", context, lambda body: True):
                self._progress(f"kube-apiserver ready at {self.url}")
                return
            proc.stop()
            if "address already in use" not in proc.tail():
                break
            self._progress(f"kube-apiserver port clash, retrying (attempt {attempt + 2})")
        raise proc.failure("did not become ready")

    def _wait_ready(
        self,
        proc: ManagedProcess,
        url: str,
        context: ssl.SSLContext | None,
        healthy: Callable[[bytes], bool],
    ) -> bool:
        """Poll ``url`` until it answers 200 and ``healthy``; False if the process died of a port
        clash; raise (with the log tail) on any other death or on the timeout."""
        opener = _no_proxy_opener(context)
        headers = {"Authorization": f"Bearer {self.token}"} if context is not None else {}
        deadline = time.monotonic() + self._timeout
        delay = 0.05
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not proc.alive():
                if "address already in use" in proc.tail():
                    return False
                raise proc.failure("exited during start-up")
            try:
                with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as response:
                    body = response.read()
                    if response.status == 200 and healthy(body):
                        return True
                    last = f"HTTP {response.status}: {body[:200]!r}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:500]!r}"
            except (OSError, ssl.SSLError) as e:
                last = repr(e)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        error = proc.failure(f"not ready after {self._timeout:.0f}s (last answer from {url}: {last})")
        raise error

    def _write_kubeconfig(self) -> None:
        assert self.base_dir is not None
        ca_data = base64.b64encode(self.ca_path.read_bytes()).decode()
        name = "kubedock-dns-testbed"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": self.url, "certificate-authority-data": ca_data}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": "admin", "namespace": "default"}}],
            "current-context": name,
        }
        # JSON is YAML: every kubeconfig reader accepts it.
        self.kubeconfig_path = _write(self.base_dir / "kubeconfig", json.dumps(config, indent=2).encode(), 0o600)


def _main(argv: Sequence[str]) -> int:
    """``python -m testbed.controlplane``: run a control plane until interrupted (for the demo)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with ControlPlane() as plane:
        print(f"export KUBECONFIG={plane.kubeconfig_path}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
