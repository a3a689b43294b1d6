"""The real process: ``twistd -n kubedock-dns`` starts, answers, reports health and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import dns.message
import dns.query

from testbed.ports import wait_for_ports
from testbed.upstream import Dnsmasq
from tests.podfactory import kubedock_pod, network_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


# Loopback only: never through a proxy the environment may name.
urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_twistd_serves_and_stops_on_sigterm(tmp_path):
    """The plugin composes the server from the command line: it answers from the pods file,
    forwards to its upstream, serves /readyz, /metrics and /debug/networks, and shuts down
    cleanly on SIGTERM."""
    net = network_id("one")
    pods = [kubedock_pod("db", [net], ip="127.20.0.1", uid="db"),
            kubedock_pod("app", [net], ip="127.20.0.2", uid="app")]
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    with Dnsmasq("127.0.0.1") as upstream:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "kubedock-dns", "--pods-file", str(tmp_path / "pods.json"),
                "--dns-port", "0", "--dns-interface", "127.0.0.1",
                "--upstream", upstream.upstream_arg, "--ops-port", "0",
                "--ops-interface", "127.0.0.1"]
        log_path = tmp_path / "twistd.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, env=twistd_env(), stdout=log, stderr=subprocess.STDOUT,
                                    text=True, cwd=str(tmp_path))
        try:
            # Port 0: the server reports the ports the kernel gave it.
            ports = wait_for_ports(log_path, ("dns", "ops"), lambda: proc.poll() is None)
            dns_port = ports["dns"]
            ops = f"http://127.0.0.1:{ports['ops']}"
            wait_for(lambda: urlopen(ops + "/readyz", timeout=1).status == 200,
                     what="/readyz")
            query = dns.message.make_query("db", "A")
            r = dns.query.udp(query, "127.0.0.1", port=dns_port, source="127.20.0.2", timeout=5)
            assert [x.address for x in r.answer[0]] == ["127.20.0.1"]
            r = dns.query.udp(dns.message.make_query(upstream.kubernetes_name, "A"), "127.0.0.1",
                              port=dns_port, source="127.20.0.2", timeout=5)
            assert [x.address for x in r.answer[0]] == [upstream.kubernetes_ip]
            metrics = urlopen(ops + "/metrics", timeout=5).read().decode()
            assert 'kubedock_dns_responses_total{outcome="answered",rcode="NOERROR"} 1.0' in metrics
            assert 'kubedock_dns_responses_total{outcome="forwarded",rcode="NOERROR"} 1.0' in metrics
            assert "kubedock_dns_answered_local_total 1" in metrics  # deprecated, until 0.2.0
            assert "kubedock_dns_forwarded_total 1" in metrics
            networks = json.load(urlopen(ops + "/debug/networks", timeout=5))
            assert sorted(m["pod"] for m in networks["networks"][net]) == ["app", "db"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            out = log_path.read_text()
        # twistd re-raises the signal after a complete shutdown, as a process killed by it would.
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Main loop terminated" in out and "Server Shut Down" in out
        assert "Traceback" not in out and "Unhandled" not in out


def test_twistd_rejects_bad_options_with_the_expected_form(tmp_path):
    """A wrong option value stops start-up with a message naming the option and the fix."""
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "kubedock-dns", "--pods-file", "/nonexistent.json", "--upstream", "127.0.0.1"]
    proc = subprocess.run(argv, env=twistd_env(), capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    assert proc.returncode != 0
    assert "--pods-file /nonexistent.json: no such file" in proc.stdout + proc.stderr
    argv[-1] = "dns.example"
    proc = subprocess.run(argv, env=twistd_env(), capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    assert "--upstream 'dns.example': expected an IP address" in proc.stdout + proc.stderr


def test_twistd_refuses_to_forward_to_its_own_service(tmp_path):
    """When the resolv.conf it forwards to names kubedock-dns' own Service address (its pod was
    opted in, so the webhook pointed it at itself), the server refuses to start and says why,
    instead of sending every forwarded query around in a loop."""
    from testbed.tls import generate_ca_and_cert

    generated = generate_ca_and_cert(["127.0.0.1"], tmp_path / "tls")
    (tmp_path / "pods.json").write_text("[]")
    (tmp_path / "resolv.conf").write_text("search tests.svc.cluster.local\nnameserver 10.96.0.53\n")
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "kubedock-dns", "--pods-file", str(tmp_path / "pods.json"),
            "--resolv-conf", str(tmp_path / "resolv.conf"), "--dns-service-ip", "10.96.0.53",
            "--tls-cert", str(generated.cert_path), "--tls-key", str(generated.key_path),
            "--dns-port", "0", "--webhook-port", "0", "--ops-port", "0",
            "--dns-interface", "127.0.0.1", "--webhook-interface", "127.0.0.1", "--ops-interface", "127.0.0.1"]
    proc = subprocess.run(argv, env=twistd_env(), capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert f"upstream 10.96.0.53 (from {tmp_path / 'resolv.conf'}) is kubedock-dns' own Service address" in output


def test_docker_fidelity_options_parse_into_the_config(tmp_path):
    """``--forward-single-label`` and repeated ``--unresolved-network`` reach the config (IDs
    lower-cased); a value that is no network ID is refused naming it and the expected form."""
    import pytest
    from twisted.python import usage

    from kubedock_dns.options import Options

    pods = tmp_path / "pods.json"
    pods.write_text("[]")
    options = Options()
    options.parseOptions(["--pods-file", str(pods), "--upstream", "127.0.0.1"])
    assert (options.config().forward_single_label, options.config().unresolved_networks) == (False, ())
    bridge = "AB" * 32
    options = Options()
    options.parseOptions(["--pods-file", str(pods), "--upstream", "127.0.0.1", "--forward-single-label",
                          "--unresolved-network", bridge, "--unresolved-network", "0123456789ab"])
    config = options.config()
    assert config.forward_single_label is True
    assert config.unresolved_networks == ("ab" * 32, "0123456789ab")
    for bad in ("bridge", "0123456789a", "g" * 64):
        with pytest.raises(usage.UsageError, match=f"--unresolved-network '{bad}': expected a Docker network ID"):
            Options().parseOptions(["--pods-file", str(pods), "--unresolved-network", bad])


def test_the_namespace_defaults_to_the_service_accounts(tmp_path):
    """Without --namespace the pod's own namespace is read from its service account mount; outside
    a pod (no file) or with an empty file, the error says to give --namespace and names the file."""
    import pytest
    from twisted.python import usage

    from kubedock_dns.options import Options

    def parsed(path):
        options = Options()
        options.service_account_namespace_file = str(path)
        options.parseOptions(["--upstream", "127.0.0.1"])
        return options["namespace"]

    mounted = tmp_path / "namespace"
    mounted.write_text("team-a\n")
    assert parsed(mounted) == "team-a"
    with pytest.raises(usage.UsageError, match="--namespace is required: cannot read .*missing"):
        parsed(tmp_path / "missing")
    mounted.write_text("\n")
    with pytest.raises(usage.UsageError, match="--namespace is required: .* is empty"):
        parsed(mounted)


def readme_walkthrough() -> list[tuple[str, str]]:
    """The commands of README.md's "Running the server by hand" block, each with the comment
    written beside it (what the reader is told to expect)."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index("## Running the server by hand"):]
    block = section[section.index("```sh\n") + len("```sh\n"):]
    block = block[:block.index("```")]
    steps = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        if command.strip():
            steps.append((command.strip(), comment.strip()))
    return steps


def test_the_readmes_pods_file_walkthrough_runs_word_for_word():
    """README.md's walkthrough, each command exactly as written (port 5353, the default ops port
    8080, ``dig -b``, the ``kubedock-dns`` command), in a private network namespace so that its
    fixed ports race nothing on this machine: each ``dig`` gets the address its comment names,
    ``kubedock-dns networks`` lists both runs' networks with their pods' addresses, and
    ``explain`` tells why run-a's service gets run-a's db."""
    import shutil

    import pytest

    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("dig"):
        pytest.skip("needs root (a private network namespace: unshare -n) and dig")
    steps = readme_walkthrough()
    server, *commands = steps
    assert server[0].startswith("twistd ") and "--pods-file examples/pods.json" in server[0], server
    assert [c for c, _ in commands if c.startswith("dig ")], "the walkthrough has no dig to check"
    script = ["set -u", "ip link set lo up",
              f"{server[0]} > \"$LOG\" 2>&1 &",
              # bounded: the server logs this once its ops port (the last listener) is up
              'for i in $(seq 600); do grep -q "ops listening" "$LOG" && break; sleep 0.1; done']
    for i, (command, _) in enumerate(commands):
        script += [f"echo '>>> step {i}'", command, f"echo \"<<< exit $?\""]
    script += ["kill -TERM %1", "wait"]
    with tempfile.TemporaryDirectory(prefix="kubedock-dns-readme-") as work:
        log_path = os.path.join(work, "server.log")
        done = subprocess.run(["unshare", "--net", "bash", "-c", "\n".join(script)], cwd=REPO,
                              env={**twistd_env(), "LOG": log_path}, capture_output=True, text=True, timeout=120)
        server_log = open(log_path).read()
    output = done.stdout
    assert done.returncode == 0, output + done.stderr + server_log
    parts = output.split(">>> step ")[1:]
    assert len(parts) == len(commands), output + server_log
    for (command, comment), part in zip(commands, parts):
        body, _, status = part.partition("<<< exit ")
        context = f"{command}\n{body}\n{done.stderr}\n{server_log}"
        assert status.split()[0] == "0", context
        if command.startswith("dig "):
            expected = [word.rstrip(",") for word in comment.split() if word.startswith("127.")]
            answers = [line.split()[-1] for line in body.splitlines()
                       if line and not line.startswith(";") and "\tA\t" in line]
            assert expected and answers == expected, context
        elif command == "kubedock-dns networks":
            pods = json.load(open(os.path.join(REPO, "examples", "pods.json")))
            for pod in pods:
                network = pod["metadata"]["annotations"]["kubedock.network/0"]
                assert network[:12] in body and pod["status"]["podIP"] in body, context
        elif command.startswith("kubedock-dns explain"):
            assert "127.77.1.1" in body and "answered from network" in body, context
