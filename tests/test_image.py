"""The container image: what the Dockerfile installs, and that its entrypoint starts.

No container engine exists on the test machines, so instead of building the image this module
replays the Dockerfile: it reads the ``RUN`` instructions marked ``# image-test: run``, copies the
build context exactly as ``.dockerignore`` filters it, and runs those commands with ``/bin/sh -c``
(as Docker does) stage by stage, with the stage's ``ARG`` and ``ENV`` values, the image's
directories (``WHEEL_DIR``, ``VENV``) redirected into a temporary directory and a fresh virtual
environment standing in for the ``python`` base image (pip's download cache allowed and .pyc
writing skipped, for speed only).  Then it starts the image's ``ENTRYPOINT``
from the result.  So the test proves the install steps the image really performs, not a copy.

The static checks below pin the properties the chart's restricted security context relies on
(a numeric non-root user, an exec-form entrypoint) and the absence of build tools in the final
stage.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import venv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MARKER = "# image-test: run"

# The options the chart passes (helm/kubedock-dns/templates/deployment.yaml): the entrypoint of
# the installed image must know every one of them.
CHART_OPTIONS = (
    "--dns-port",
    "--webhook-port",
    "--ops-port",
    "--tls-cert",
    "--tls-key",
    "--dns-service-name",
    "--dns-service-ip",
    "--namespace",
    "--opt-in-label",
    "--ttl",
    "--cluster-domain",
    "--ndots",
    "--upstream",
    "--require-ready",
)


# --- a small Dockerfile reader -------------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction with continuation lines joined, and whether it is marked."""

    keyword: str
    arguments: str
    marked: bool


@dataclass
class Stage:
    """One ``FROM`` ... stage: its base, name and instructions."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]


def parse_dockerfile(text: str) -> Dockerfile:
    """Split a Dockerfile into global ARGs and stages; continuation lines joined as Docker does
    (the backslash and newline vanish; comment lines inside a continuation are dropped)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    lines = text.splitlines()
    i = 0
    marked = False
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        if line.startswith("#"):
            if line == MARKER:
                marked = True
            continue
        parts = [line]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1]
            nxt = lines[i]
            i += 1
            if nxt.strip().startswith("#"):
                parts.append("\\")  # keep continuing past the comment
                continue
            parts.append(nxt)
        joined = "".join(p for p in parts if p != "\\")
        keyword, _, arguments = joined.strip().partition(" ")
        keyword = keyword.upper()
        instruction = Instruction(keyword, arguments.strip(), marked)
        marked = False
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if keyword == "ARG":
                key, _, default = arguments.strip().partition("=")
                global_args[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(text: str, variables: dict[str, str]) -> str:
    """Dockerfile variable substitution (``$VAR`` and ``${VAR}``)."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def env_pairs(arguments: str) -> list[tuple[str, str]]:
    """The ``KEY=VALUE`` pairs of an ``ENV`` instruction."""
    return [tuple(word.split("=", 1)) for word in shlex.split(arguments)]  # type: ignore[misc]


def shell_command(run_arguments: str) -> str:
    """The shell-form command of a ``RUN``, without its ``--mount``/``--network`` flags."""
    rest = run_arguments.strip()
    while rest.startswith("--"):
        rest = rest.split(None, 1)[1] if " " in rest else ""
        rest = rest.lstrip()
    assert not rest.startswith("["), "marked RUN instructions must use the shell form"
    return rest


# --- .dockerignore, with moby's patternmatcher semantics -----------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        else:
            c = pattern[i]
            out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
            i += 1
    return re.compile(f"^{out}$")


def build_context_files(root: Path) -> list[Path]:
    """Relative paths of the files ``docker build`` would send: the last matching pattern of
    ``.dockerignore`` decides, and a pattern matching a parent directory matches its files."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        exclude = not raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!").strip("/"))
        rules.append((exclude, pattern, _pattern_regex(pattern), pattern.count("/") + 1))
    kept = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or ".git" in path.relative_to(root).parts[:1]:
            continue
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        excluded = False
        for exclude, _, regex, depth in rules:
            if regex.match(rel) or (len(parts) > depth and regex.match("/".join(parts[:depth]))):
                excluded = exclude
        if not excluded:
            kept.append(Path(rel))
    return kept


# --- the replay ----------------------------------------------------------------------------------


def _host_env(base_bin: Path) -> dict[str, str]:
    """The environment a fresh ``python`` image would give: its interpreter first on PATH, none of
    this machine's Python or pip redirections (the network settings, like certificates, stay)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "PYENV", "VIRTUAL_ENV", "CONDA"))
        and k not in {"PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV", "PIP_USER"}
    }
    env["PATH"] = f"{base_bin}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
    return env


def replay(dockerfile: Dockerfile, context: Path, work: Path) -> dict[str, str]:
    """Run every marked RUN of every stage; return the final stage's environment."""
    base = work / "base-python"
    venv.EnvBuilder(with_pip=True, clear=True).create(base)
    build_args = {"WHEEL_DIR": str(work / "wheels"), "VENV": str(work / "image-venv")}
    env: dict[str, str] = {}
    for stage in dockerfile.stages:
        env = _host_env(base / "bin")
        variables = dict(env)
        cwd = work
        for instruction in stage.instructions:
            if instruction.keyword == "ARG":
                key, _, default = instruction.arguments.partition("=")
                value = build_args.get(key, default or dockerfile.global_args.get(key, ""))
                variables[key] = env[key] = value
            elif instruction.keyword == "ENV":
                for key, value in env_pairs(instruction.arguments):
                    variables[key] = env[key] = substitute(value, variables)
            elif instruction.keyword == "WORKDIR":
                cwd = work / "root" / instruction.arguments.lstrip("/")
                cwd.mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY" and instruction.arguments.split() == [".", "."]:
                for rel in build_context_files(context):
                    (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / rel, cwd / rel)
            elif instruction.keyword == "RUN" and instruction.marked:
                command = shell_command(instruction.arguments)
                # The deliberate differences: pip may use this machine's download cache and skips
                # writing .pyc files.  They change how long the test takes (minutes on a busy
                # 2-core machine), never which packages get installed.
                run_env = {k: v for k, v in env.items() if k != "PIP_NO_CACHE_DIR"}
                run_env["PIP_NO_COMPILE"] = "1"
                result = subprocess.run(
                    ["/bin/sh", "-c", command], cwd=cwd, env=run_env, capture_output=True, text=True, timeout=300
                )
                assert result.returncode == 0, (
                    f"Dockerfile step failed ({result.returncode}): RUN {command}\n"
                    f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
                )
    return env


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_final_stage_runs_as_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    """The final stage switches to uid 10001 by number, so Kubernetes' runAsNonRoot can verify it
    (a user name cannot be checked) and it matches the chart's runAsUser."""
    users = [i.arguments for i in dockerfile.stages[-1].instructions if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] == "10001"


def test_entrypoint_is_twistd_kubedock_dns_in_exec_form(dockerfile: Dockerfile) -> None:
    """The entrypoint is exactly ``twistd --nodaemon --pidfile= kubedock-dns`` in exec form: no
    shell in between (signals reach twistd), no pid file (read-only root filesystem), and the
    chart's ``args`` are appended as the plugin's options."""
    entrypoints = [i.arguments for i in dockerfile.stages[-1].instructions if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoints[-1]) == ["twistd", "--nodaemon", "--pidfile=", "kubedock-dns"]


def test_final_stage_has_no_build_tools(dockerfile: Dockerfile) -> None:
    """Multi-stage: the final stage starts from the slim Python image, installs no system packages
    or compilers, installs only from pre-built wheels (never an index), and copies no sources."""
    assert len(dockerfile.stages) >= 2
    final = dockerfile.stages[-1]
    base = substitute(final.base, dockerfile.global_args)
    assert re.fullmatch(r"python:3\.11-slim(@sha256:[0-9a-f]{64})?", base), base
    runs = " ".join(i.arguments for i in final.instructions if i.keyword == "RUN")
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "git "):
        assert tool not in runs
    assert "--no-index" in runs
    assert not any(i.keyword in {"COPY", "ADD"} and i.arguments.split()[:1] == ["."] for i in final.instructions)
    assert any(i.marked and i.keyword == "RUN" for i in final.instructions)


def test_build_context_holds_only_what_the_wheel_needs() -> None:
    """``.dockerignore`` keeps the package, the Twisted plugin and the packaging metadata, and
    leaves out tests, the test bed, the chart, caches and the plugin cache of this checkout."""
    files = {p.as_posix() for p in build_context_files(REPO)}
    assert "setup.cfg" in files and "kubedock_dns/__init__.py" in files
    assert "twisted/plugins/kubedock_dns.py" in files
    for path in files:
        assert not path.startswith(("tests/", "testbed/", "helm/", "docs/", ".git/", "examples/"))
        assert "__pycache__" not in path and not path.endswith("dropin.cache")


def test_dockerfile_install_steps_produce_a_working_entrypoint(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """Replaying the image's install steps in a clean virtual environment gives an environment in
    which the image's entrypoint starts and knows every option the Helm chart passes to it; the
    installed set holds the package, plugin and the ``kubedock-dns`` command but not the tests or
    test bed."""
    env = replay(dockerfile, REPO, tmp_path)
    image_venv = Path(env["VENV"])
    assert (image_venv / "bin" / "twistd").exists()

    entrypoint = json.loads(
        [i.arguments for i in dockerfile.stages[-1].instructions if i.keyword == "ENTRYPOINT"][-1]
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = subprocess.run(
        [*entrypoint, "--help"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"entrypoint failed:\n{result.stdout}\n{result.stderr}"
    for option in CHART_OPTIONS:
        assert option in result.stdout, f"{option} missing from `kubedock-dns --help`:\n{result.stdout}"

    python = image_venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c",
         "import importlib.util as u, twisted.plugins.kubedock_dns, kubedock_dns;"
         "print(u.find_spec('testbed') is None, u.find_spec('tests') is None)"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "True"]
    # `kubectl exec deploy/kubedock-dns -- kubedock-dns explain ...`: the console command is on
    # the image's PATH and asks the ops port (here nothing listens: a clear error, status 2).
    command = image_venv / "bin" / "kubedock-dns"
    assert command.exists(), "the kubedock-dns console command is not installed"
    asked = subprocess.run([str(command), "--ops", "http://127.0.0.1:1", "networks"], cwd=run_dir, env=env,
                           capture_output=True, text=True, timeout=60)
    assert asked.returncode == 2 and "cannot ask the server at http://127.0.0.1:1" in asked.stderr, asked
    # The plugin cache was written at build time, so a read-only root filesystem costs nothing.
    caches = list((image_venv / "lib").glob("python3*/site-packages/twisted/plugins/dropin.cache"))
    assert caches, "Twisted's plugin cache was not written during the install"
