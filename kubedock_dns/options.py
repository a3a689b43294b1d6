"""Command-line options of ``twistd kubedock-dns``, validated into a frozen :class:`Config`."""

from __future__ import annotations

import ipaddress
import math
import os
import sys
from dataclasses import dataclass

from twisted.python import usage

from kubedock_dns.contract import DEFAULT_OPT_IN_LABEL, DEFAULT_SSHD_IMAGE, ImagePattern, ascii_decimal
from kubedock_dns.dns.upstreams import Upstream, parse_upstream, upstreams_from_resolv_conf
from kubedock_dns.kube.policies import parse_selector
from kubedock_dns.ops import logs
from kubedock_dns.ops.build import version_line
from kubedock_dns.ops.latency import sampling_mask

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def service_account_namespace(path: str = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace this process runs in, from its service account; ValueError, saying what to
    give instead, outside a pod or when the file is unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            namespace = f.read().strip()
    except OSError as e:
        raise ValueError(f"--namespace is required: cannot read the pod's namespace from {path} "
                         f"({e.strerror}): not running in a pod?") from None
    if not namespace:
        raise ValueError(f"--namespace is required: {path} is empty")
    return namespace


@dataclass(frozen=True)
class Config:
    dns_port: int = 5353
    dns_interface: str = ""
    resolv_conf: str = "/etc/resolv.conf"
    upstreams: tuple[Upstream, ...] = ()
    ttl: int = 5
    hold_timeout: float = 1.5
    forward_timeout: float = 2.0
    max_forwards: int = 1024
    namespace: str = ""
    kubeconfig: str | None = None
    opt_in_label: str = DEFAULT_OPT_IN_LABEL
    require_ready: bool = False
    forward_single_label: bool = False
    unresolved_networks: tuple[str, ...] = ()
    sshd_images: tuple[str, ...] = (DEFAULT_SSHD_IMAGE,)
    pods_file: str | None = None
    webhook_port: int = 8443
    webhook_interface: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    dns_service_ip: str | None = None
    dns_service_name: str | None = None
    cluster_domain: str = "cluster.local"
    ndots: int = 5
    ops_port: int = 8080
    ops_interface: str = ""
    fast_path: bool = True
    verbose: bool = False
    latency_sample_every: int = 16
    log_format: str = "text"
    log_level: str = "info"
    network_policies: bool = False
    kubedock_pod_selector: tuple[tuple[str, str], ...] = ()
    isolation_policy: str = "kubedock-dns-isolation"
    drain_seconds: float = 5.0
    review_timeout: float = 4.0

    @property
    def webhook_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


def _count(text: str) -> int:
    """A whole number of at most nine ASCII digits (see ``contract.ascii_decimal``)."""
    return ascii_decimal(text.strip(), 9)


def _port(text: str) -> int:
    value = ascii_decimal(text.strip(), 5)
    if not 0 <= value < 65536:
        raise ValueError(f"{text} is not a port number (0-65535)")
    return value


def _finite_float(text: str) -> float:
    """A number of seconds: ``nan`` compares false with every bound, so it (and the infinities)
    are refused here rather than slipping past the range checks."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number of seconds")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise ValueError(f"{text} must be greater than 0")
    return value


def _drain_seconds(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 3600:
        raise ValueError(f"{text} must be 0 (stop at once) to 3600 seconds")
    return value


def _positive_int(text: str) -> int:
    value = _count(text)
    if value <= 0:
        raise ValueError(f"{text} must be greater than 0")
    return value


_port.coerceDoc = "A port number, 0 to 65535 (0: any free port)."  # type: ignore[attr-defined]


class Options(usage.Options):
    synopsis = "[options]"
    service_account_namespace_file = SERVICE_ACCOUNT_NAMESPACE  # where a pod's namespace is read (tests move it)
    longdesc = (
        "Serve Docker-network name resolution to kubedock pods of one namespace: a DNS server that "
        "answers from the asking pod's networks, an admission webhook that points opted-in pods at "
        "it, and a watcher that follows the pods."
    )
    optParameters = [
        ["dns-port", None, 5353, "UDP and TCP port of the DNS server.", _port],
        ["dns-interface", None, "", "Address the DNS server binds ('' = all IPv4, '::' = IPv4 and IPv6)."],
        ["resolv-conf", None, "/etc/resolv.conf", "resolv.conf whose nameservers are the upstreams."],
        ["ttl", None, 5, "TTL in seconds of local answers.", _count],
        ["hold-timeout", None, 1.5, "Seconds a question for a not-yet-known name waits for it.", _positive_float],
        ["forward-timeout", None, 2.0, "Seconds to wait for one upstream before trying the next.", _positive_float],
        ["max-forwards", None, 1024, "Forwarded queries in flight before REFUSED.", _positive_int],
        ["namespace", None, "", "Namespace to watch (default: the service account's namespace)."],
        ["kubeconfig", None, None, "kubeconfig file (default: in-cluster configuration)."],
        ["opt-in-label", None, DEFAULT_OPT_IN_LABEL, "Label (value \"true\") marking pods to serve."],
        ["pods-file", None, None, "JSON list of pods to serve instead of watching the API server."],
        ["webhook-port", None, 8443, "HTTPS port of the admission webhook.", _port],
        ["webhook-interface", None, "", "Address the webhook binds."],
        ["tls-cert", None, None, "PEM certificate (chain) of the webhook; with --tls-key enables it."],
        ["tls-key", None, None, "PEM private key of the webhook."],
        ["dns-service-ip", None, None, "Address the webhook injects as the pods' nameserver."],
        ["dns-service-name", None, None, "Service whose cluster IP the webhook injects."],
        ["cluster-domain", None, "cluster.local", "Cluster DNS domain (search suffixes are stripped)."],
        ["ndots", None, 5, "ndots option injected into opted-in pods.", _count],
        ["ops-port", None, 8080, "Plain HTTP port for /healthz, /readyz, /metrics, /debug/networks.", _port],
        ["ops-interface", None, "", "Address the ops endpoint binds."],
        ["latency-sample-every", None, 16,
         "Time one query in N (a power of two) for the latency histograms (1: every query, 0: none).", int],
        ["kubedock-pod-selector", None, "",
         "With --network-policies: labels of kubedock's own pods (key=value[,key=value]), let in to "
         "every opted-in pod (its reverse proxy dials pod IPs); empty: none."],
        ["isolation-policy", None, "kubedock-dns-isolation",
         "With --network-policies: name of the default-deny NetworkPolicy that owns the per-network ones."],
        ["drain-seconds", None, 5.0,
         "On SIGTERM/SIGINT, seconds to keep answering (DNS, webhook) while /readyz says not ready, "
         "so that the Service stops sending here first; 0: stop at once.  A second signal ends the "
         "drain.", _drain_seconds],
        ["review-timeout", None, 4.0,
         "Seconds an admission review may take; past it the review is answered 503 (the webhook's "
         "failurePolicy applies) and the review worker is replaced.  Keep it below the webhook's "
         "timeoutSeconds.", _positive_float],
        ["log-format", None, "text",
         "Log format: text (twistd's lines) or json (one object a line: time, level, logger, msg and "
         "the event's fields)."],
        ["log-level", None, None,
         "Least severe level logged: debug, info, warn or error (default: info; --verbose makes it debug)."],
    ]
    optFlags = [
        ["require-ready", None, "Answer for pods only once they are Ready (Docker does not wait)."],
        ["forward-single-label", None,
         "Forward single-label names that no network of the asker holds (db, db.<ns>.svc.<domain>) "
         "to the cluster DNS instead of answering NXDOMAIN, so the namespace's Services answer them. "
         "Risk: a Service called like a missing container answers in its place."],
        ["no-fast-path", None, "Answer every query through the full twisted.names path."],
        ["network-policies", None,
         "Docker's network isolation: label opted-in pods per network at admission and keep one "
         "NetworkPolicy per network (plus a default-deny one) in the namespace; off removes them."],
        ["verbose", "v", "Log one structured debug line per decision (answers through the full path; "
                         "logs from debug up whatever --log-level says)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["upstream"] = []
        self["unresolved-network"] = []
        self["testcontainers-sshd-image"] = []

    def opt_version(self) -> None:
        """Print the version (and Python's and Twisted's) and exit."""
        print(version_line())
        sys.exit(0)

    def opt_unresolved_network(self, value: str) -> None:
        """Docker network ID (64 hex, or a prefix of 12 or more, as `docker network ls` shows)
        whose names are never resolved, as on Docker's default bridge; repeat for several."""
        lowered = value.strip().lower()
        if not 12 <= len(lowered) <= 64 or any(c not in "0123456789abcdef" for c in lowered):
            raise usage.UsageError(
                f"--unresolved-network {value!r}: expected a Docker network ID, 64 hexadecimal "
                f"characters or the first 12 or more of them (docker network inspect bridge -f '{{{{.Id}}}}')"
            )
        self["unresolved-network"].append(lowered)

    def opt_testcontainers_sshd_image(self, value: str) -> None:
        """Image of Testcontainers' sshd container (Testcontainers' sshd.container.image), whose
        pod answers host.testcontainers.internal for its session: a repository matches every tag
        and any registry prefix, a tag or registry must match too; repeat for several (default:
        testcontainers/sshd)."""
        try:
            ImagePattern.parse(value)
        except ValueError as e:
            raise usage.UsageError(f"--testcontainers-sshd-image {value!r}: {e}") from None
        self["testcontainers-sshd-image"].append(value.strip())

    def opt_upstream(self, value: str) -> None:
        """Upstream nameserver HOST[:PORT]; repeat for several (default: from --resolv-conf)."""
        try:
            self["upstream"].append(parse_upstream(value))
        except ValueError as e:
            raise usage.UsageError(f"--upstream {value!r}: expected an IP address with an optional port, such as 10.96.0.10 or 10.96.0.10:53 ({e})")

    def postOptions(self) -> None:
        if self["ttl"] < 0:
            raise usage.UsageError(f"--ttl {self['ttl']}: must be 0 or more seconds")
        if self["hold-timeout"] >= 5:
            raise usage.UsageError(
                f"--hold-timeout {self['hold-timeout']}: must stay below the resolver's 5 s timeout"
            )
        if self["review-timeout"] >= 30:
            raise usage.UsageError(
                f"--review-timeout {self['review-timeout']}: must stay below the API server's "
                f"longest webhook timeout, 30 s")
        if self["dns-service-ip"]:
            try:
                ipaddress.ip_address(self["dns-service-ip"])
            except ValueError:
                raise usage.UsageError(f"--dns-service-ip {self['dns-service-ip']!r} is not an IP address")
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together: give both or neither")
        if self["tls-cert"] and not (self["dns-service-ip"] or self["dns-service-name"]):
            raise usage.UsageError(
                "the webhook needs the nameserver address to inject: give --dns-service-ip or --dns-service-name"
            )
        for flag in ("pods-file", "tls-cert", "tls-key", "kubeconfig"):
            if self[flag] and not os.path.exists(self[flag]):
                raise usage.UsageError(f"--{flag} {self[flag]}: no such file")
        if not self["upstream"] and not os.path.exists(self["resolv-conf"]):
            raise usage.UsageError(f"--resolv-conf {self['resolv-conf']}: no such file (or give --upstream)")
        try:
            sampling_mask(self["latency-sample-every"])
        except ValueError as e:
            raise usage.UsageError(f"--latency-sample-every {self['latency-sample-every']}: {e}")
        try:
            self["kubedock-pod-selector"] = parse_selector(self["kubedock-pod-selector"])
        except ValueError as e:
            raise usage.UsageError(f"--kubedock-pod-selector: {e}")
        if (self["kubedock-pod-selector"] or self["isolation-policy"] != "kubedock-dns-isolation") \
                and not self["network-policies"]:
            raise usage.UsageError("--kubedock-pod-selector and --isolation-policy need --network-policies")
        if self["network-policies"] and self["pods-file"]:
            raise usage.UsageError("--network-policies needs the API server: it cannot go with --pods-file")
        self._configure_logging()
        namespace = self["namespace"]
        if not namespace:
            try:
                namespace = service_account_namespace(self.service_account_namespace_file)
            except ValueError as e:
                if not self["pods-file"]:
                    raise usage.UsageError(str(e)) from None
        self["namespace"] = namespace

    def _configure_logging(self) -> None:
        """Check --log-format and --log-level and, under twistd, make twistd log through
        :func:`kubedock_dns.ops.logs.observer` (twistd starts logging after makeService, from its
        own --logger option, which takes a name)."""
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(f"--log-format {self['log-format']!r}: expected text or json")
        level = self["log-level"]
        if level is not None and level not in logs.LEVELS:
            raise usage.UsageError(f"--log-level {level!r}: expected one of {', '.join(logs.LEVELS)}")
        # --verbose asks for a debug line per decision: a --log-level above debug (the chart
        # always passes one) must not silently drop them.
        self["log-level"] = "debug" if self["verbose"] else (level or "info")
        if self.parent is None:
            return
        if self.parent.get("logger") or self.parent.get("syslog"):
            # The user's own twistd logging takes over; ours cannot apply to it.
            if self["log-format"] != "text" or level is not None:
                raise usage.UsageError("twistd --logger/--syslog replace kubedock-dns' logging: "
                                       "drop --log-format and --log-level, or those twistd options")
            return
        logs.configure(logs.LogSettings(format=self["log-format"], level=self["log-level"],
                                        logfile=self.parent.get("logfile"),
                                        foreground=bool(self.parent.get("nodaemon"))))
        self.parent["logger"] = "kubedock_dns.ops.logs.observer"

    def config(self) -> Config:
        return Config(
            dns_port=self["dns-port"],
            dns_interface=self["dns-interface"],
            resolv_conf=self["resolv-conf"],
            upstreams=tuple(self["upstream"]),
            ttl=self["ttl"],
            hold_timeout=self["hold-timeout"],
            forward_timeout=self["forward-timeout"],
            max_forwards=self["max-forwards"],
            namespace=self["namespace"],
            kubeconfig=self["kubeconfig"],
            opt_in_label=self["opt-in-label"],
            require_ready=bool(self["require-ready"]),
            forward_single_label=bool(self["forward-single-label"]),
            unresolved_networks=tuple(self["unresolved-network"]),
            sshd_images=tuple(self["testcontainers-sshd-image"]) or (DEFAULT_SSHD_IMAGE,),
            pods_file=self["pods-file"],
            webhook_port=self["webhook-port"],
            webhook_interface=self["webhook-interface"],
            tls_cert=self["tls-cert"],
            tls_key=self["tls-key"],
            dns_service_ip=self["dns-service-ip"],
            dns_service_name=self["dns-service-name"],
            cluster_domain=self["cluster-domain"],
            ndots=self["ndots"],
            ops_port=self["ops-port"],
            ops_interface=self["ops-interface"],
            fast_path=not self["no-fast-path"],
            verbose=bool(self["verbose"]),
            latency_sample_every=self["latency-sample-every"],
            log_format=self["log-format"],
            log_level=self["log-level"],
            network_policies=bool(self["network-policies"]),
            kubedock_pod_selector=tuple(sorted(self["kubedock-pod-selector"].items())),
            isolation_policy=self["isolation-policy"],
            drain_seconds=self["drain-seconds"],
            review_timeout=self["review-timeout"],
        )


def upstreams_of(config: Config) -> list[Upstream]:
    """Where questions that are not ours go: ``--upstream``, else every nameserver of
    ``--resolv-conf`` (read now; OSError when it cannot be)."""
    if config.upstreams:
        return list(config.upstreams)
    with open(config.resolv_conf) as f:
        return upstreams_from_resolv_conf(f.read())


def check_no_upstream_loop(config: Config, upstreams: list[Upstream], nameserver: str | None) -> None:
    """ValueError when an upstream is ``nameserver``, kubedock-dns' own Service address that the
    webhook gives opted-in pods: every forwarded query would come back here."""
    if nameserver is None:
        return
    looping = [u for u in upstreams if ipaddress.ip_address(u.host) == ipaddress.ip_address(nameserver)]
    if looping:
        source = "--upstream" if config.upstreams else config.resolv_conf
        raise ValueError(
            f"upstream {looping[0].host} (from {source}) is kubedock-dns' own Service address, which the "
            f"webhook gives opted-in pods: every forwarded query would come back here. Do not label "
            f"kubedock-dns' own pods for opt-in, and leave them dnsPolicy ClusterFirst (or give --upstream)"
        )
