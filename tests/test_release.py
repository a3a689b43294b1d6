"""The release files a user expects, and that they agree with each other.

- LICENSE is the Apache License 2.0 that setup.cfg, the image label and the chart claim;
- CHANGELOG.md follows Keep a Changelog and its newest entry is this version;
- the version is one number: ``kubedock_dns.__version__`` is repeated by Chart.yaml (version and
  appVersion), the Dockerfile's ``VERSION``, the ``TAG=`` lines of the README and
  docs/install.md, the chart README and the changelog, and a mismatch names every place;
- the project's address is one URL (Chart.yaml home/sources/maintainers, setup.cfg, the image
  labels, the alerts' runbook links);
- the image's Python dependencies are locked with hashes (image-requirements.txt) and the lock
  satisfies setup.cfg exactly: every requirement pinned within its range, nothing unneeded,
  every pin with a sha256; the Dockerfile installs from it with --require-hashes, and its base is
  pinned by digest yet overridable;
- the README says to build and push the image (and the chart) before installing, with the same
  command the image test runs, and states the minimum kubedock version (0.18.0: the first with
  the network annotations and ``--disable-services``, read from kubedock's history), which the
  real kubedock here satisfies.
"""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "kubedock-dns"
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "image-requirements.txt"
HOME = "https://github.com/kubedock-dns/kubedock-dns"
# kubedock 0.18.0 (2025-01-12) added the kubedock.network/N and kubedock.hostalias/N annotations
# (PR #109) and --disable-services (PR #111); `git tag --contains` on both commits starts there.
MIN_KUBEDOCK = "0.18.0"
# The real kubedock sits in ../shared/kubedock beside the checkout (from a worktree one level up).
KUBEDOCK = next((p for p in (REPO.parent / "shared" / "kubedock" / "kubedock",
                             REPO.parent.parent / "shared" / "kubedock" / "kubedock") if p.exists()),
                REPO.parent / "shared" / "kubedock" / "kubedock")


def project_version() -> str:
    text = (REPO / "kubedock_dns" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert found, "kubedock_dns/__init__.py must set __version__"
    return found.group(1)


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


# --- licence and changelog --------------------------------------------------------------------


def test_license_is_the_apache_license_that_everything_claims() -> None:
    """LICENSE holds the full Apache License 2.0 (all nine sections and the end of the terms);
    setup.cfg, the image label and nothing else name another licence."""
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    for section in range(1, 10):
        assert re.search(rf"^\s+{section}\. [A-Z]", text, re.M), f"section {section} missing"
    assert "END OF TERMS AND CONDITIONS" in text
    assert setup_cfg()["metadata"]["license"] == "Apache-2.0"
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in DOCKERFILE.read_text()


def test_changelog_keeps_a_changelog_and_names_this_version() -> None:
    """CHANGELOG.md: the Keep a Changelog preamble, an Unreleased section first, every release
    as ``## [X.Y.Z] - YYYY-MM-DD`` newest first, only the six kinds of change as subsections, a
    link for every section; the newest entry is this version (released, or named as the one
    Unreleased becomes)."""
    text = (REPO / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in text and "https://semver.org/" in text
    sections = re.findall(r"^## \[([^\]]+)\](.*)$", text, re.M)
    assert sections and sections[0] == ("Unreleased", ""), sections[:1]
    versions = []
    for name, rest in sections[1:]:
        assert re.fullmatch(r" - \d{4}-\d{2}-\d{2}", rest), f"## [{name}]{rest}: expected ' - YYYY-MM-DD'"
        versions.append(Version(name))
    assert versions == sorted(versions, reverse=True)
    kinds = set(re.findall(r"^### (.+)$", text, re.M))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, kinds
    for name, _ in sections:
        assert re.search(rf"^\[{re.escape(name)}\]: https://", text, re.M), f"no link for [{name}]"
    version = project_version()
    unreleased = text.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    assert (versions and str(versions[0]) == version) or version in unreleased


# --- one version, one address -------------------------------------------------------------------


def version_places() -> dict[str, str]:
    """Every place that repeats the version -> the version written there."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    places = {"Chart.yaml version": str(chart["version"]), "Chart.yaml appVersion": str(chart["appVersion"])}
    found = re.search(r"^ARG VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    places["Dockerfile ARG VERSION"] = found.group(1) if found else "(missing)"
    for name, path in [("README.md", REPO / "README.md"), ("docs/install.md", REPO / "docs" / "install.md"),
                       ("helm/kubedock-dns/README.md", CHART / "README.md")]:
        tags = set(re.findall(r"\bTAG=(\d[\w.+-]*)", path.read_text()))
        places[f"{name} TAG="] = ", ".join(sorted(tags)) or "(missing)"
    return places


def test_the_version_is_written_the_same_everywhere() -> None:
    """kubedock_dns/__init__.py is the source; every place that repeats the number agrees (the
    failure lists each place that does not)."""
    version = project_version()
    wrong = {place: found for place, found in version_places().items() if found != version}
    assert not wrong, f"kubedock_dns.__version__ is {version}; these places say otherwise: {wrong}"


@pytest.mark.parametrize("command", [
    ["-c", "from twisted.scripts.twistd import run; run()", "kubedock-dns", "--version"],
    ["-m", "kubedock_dns", "--version"],
])
def test_the_commands_print_the_version(command: list[str], tmp_path: Path) -> None:
    """``twistd kubedock-dns --version`` and ``kubedock-dns --version`` print the version from
    kubedock_dns/__init__.py (with Python's and Twisted's) and exit 0, starting nothing."""
    import os
    import platform
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.fullmatch(rf"kubedock-dns {re.escape(project_version())} \(Python {platform.python_version()}, "
                        rf"Twisted \d[\w.]*\)\n", done.stdout), done.stdout
    assert list(tmp_path.iterdir()) == []  # no twistd.pid, no twistd.log: nothing started


def test_the_project_has_one_address() -> None:
    """Chart.yaml's home, sources and maintainers, setup.cfg's url, the image's source and url
    labels and every alert's runbook link point at this project (not kubedock)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["home"] == HOME and chart["sources"] == [HOME]
    assert chart["maintainers"] and all(m.get("url") == HOME and m.get("name") for m in chart["maintainers"])
    assert setup_cfg()["metadata"]["url"] == HOME
    dockerfile = DOCKERFILE.read_text()
    for label in ("source", "url"):
        assert f'org.opencontainers.image.{label}="{HOME}"' in dockerfile
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert rule["annotations"]["runbook_url"].startswith(f"{HOME}/blob/main/docs/runbooks.md#")


# --- the image's inputs -------------------------------------------------------------------------


def parse_lock(text: str) -> dict[str, tuple[str, list[str], list[str]]]:
    """image-requirements.txt -> name -> (version, sha256 hashes, the "via" lines)."""
    entries: dict[str, tuple[str, list[str], list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", "\n" + text):
        head = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block.strip())
        if not head:
            continue
        name = canonicalize_name(head.group(1))
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        via = []
        if "# via" in block:  # "# via a" or "# via" followed by "#   a" lines
            for line in block.split("# via", 1)[1].splitlines():
                item = line.strip().lstrip("#").strip()
                if item:
                    via.append(item)
        entries[name] = (head.group(2), hashes, via)
    return entries


def install_requires() -> list[Requirement]:
    return [Requirement(line) for line in setup_cfg()["options"]["install_requires"].strip().splitlines()]


def test_lock_satisfies_setup_cfg_exactly_with_hashes() -> None:
    """Every requirement of setup.cfg (with its extras' packages) is pinned in the lock within its
    range; every pin carries sha256 hashes; and every pin is needed: pip-compile's "via" trail
    leads from it back to setup.cfg, so nothing stale stays in the image."""
    lock = parse_lock(LOCK.read_text())
    assert len(lock) >= len(install_requires())
    for requirement in install_requires():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"setup.cfg requires {requirement}, the lock lacks {name}"
        version = lock[name][0]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"setup.cfg requires {requirement}, the lock pins {name}=={version}"
    for name, (version, hashes, via) in lock.items():
        assert hashes, f"{name}=={version} has no --hash"
        assert via, f"{name}=={version} says nowhere why it is there"
    needed = {"kubedock-dns (setup.cfg)"}
    changed = True
    while changed:
        changed = False
        for name, (_, _, via) in lock.items():
            if name not in needed and any(v in needed or canonicalize_name(v.split()[0]) in needed for v in via):
                needed.add(name)
                changed = True
    assert set(lock) <= needed, f"pinned but needed by nothing: {sorted(set(lock) - needed)}"


def test_lock_check_catches_a_pin_outside_setup_cfg() -> None:
    """The check above bites: a lock pinning kubernetes 36 against setup.cfg's '>= 37' fails."""
    text = re.sub(r"^kubernetes==\S+", "kubernetes==36.1.0", LOCK.read_text(), flags=re.M)
    lock = parse_lock(text)
    requirement = next(r for r in install_requires() if canonicalize_name(r.name) == "kubernetes")
    assert not requirement.specifier.contains(lock["kubernetes"][0])


def test_dockerfile_installs_only_the_locked_wheels_on_a_pinned_base() -> None:
    """The base is a digest-pinned python:3.11-slim-bookworm, declared before the first FROM so
    ``--build-arg PYTHON_IMAGE=...`` replaces it in both stages; the builder fetches exactly the
    lock with --require-hashes (wheels only) and the final stage installs it again with
    --require-hashes, plus only the project's own wheel, and checks the result; the build context
    lets the lock in; the image carries the OCI labels."""
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1)), base
    assert text.index("ARG PYTHON_IMAGE=") < text.index("\nFROM ")
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert re.search(r"pip download --require-hashes --only-binary=:all: --no-deps .*-r image-requirements\.txt", text)
    assert re.search(r'pip" install --no-index --find-links "\$WHEEL_DIR" --require-hashes -r', text)
    assert re.search(r'pip" install --no-index --no-deps "\$WHEEL_DIR"/kubedock_dns-\*\.whl', text)
    assert 'pip" check' in text
    assert "!image-requirements.txt" in (REPO / ".dockerignore").read_text().splitlines()
    for label in ("title", "description", "version", "revision", "licenses", "url", "source", "documentation",
                  "base.name"):
        assert f"org.opencontainers.image.{label}=" in text, label


# --- the README: build and push first, and which kubedock -------------------------------------------


def readme_install_block() -> str:
    section = (REPO / "README.md").read_text().split("## Using it with kubedock", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def test_readme_builds_and_pushes_the_image_and_chart_before_installing() -> None:
    """The README's install block pushes the image to your registry with the Dockerfile line the
    image test runs (docs/install.md's, in its docker form), packages and pushes the chart there,
    and only then installs that chart from oci:// with that image; kubedock follows."""
    lines = readme_install_block().replace("\\\n", "").splitlines()
    order = [i for prefix in ("export REGISTRY=", "docker build ", "helm package ", "helm upgrade --install ",
                              "kubedock server ")
             for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(order) == 5 and order == sorted(order), lines
    install_doc = (REPO / "docs" / "install.md").read_text().split("## 1.", 1)[1].split("\n## ", 1)[0]
    docker = next(line for line in lines if line.startswith("docker build "))
    assert docker in install_doc.splitlines(), "the README's docker line must be docs/install.md's"
    publish = next(line for line in lines if line.startswith("helm package "))
    assert publish == 'helm package helm/kubedock-dns && helm push "kubedock-dns-$TAG.tgz" "oci://$REGISTRY/charts"'
    install = next(line for line in lines if line.startswith("helm upgrade --install "))
    assert '"oci://$REGISTRY/charts/kubedock-dns" --version "$TAG"' in install
    assert 'image.repository="$REGISTRY/kubedock-dns"' in install
    assert "--disable-services" in next(line for line in lines if line.startswith("kubedock server "))


def test_minimum_kubedock_version_is_stated_and_met_here() -> None:
    """README, docs/install.md and the chart README state kubedock 0.18.0 or newer; the real
    kubedock the tests run (when present) is at least that and has --disable-services."""
    for path in (REPO / "README.md", REPO / "docs" / "install.md", CHART / "README.md"):
        assert f"kubedock {MIN_KUBEDOCK} or newer" in " ".join(path.read_text().split()), path
    if not KUBEDOCK.exists():
        pytest.skip(f"the real kubedock is not here ({KUBEDOCK}); the documents were checked")
    version = subprocess.run([str(KUBEDOCK), "version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"version:\s*v?(\d+\.\d+\.\d+)", version.stdout + version.stderr)
    assert found and Version(found.group(1)) >= Version(MIN_KUBEDOCK), version.stdout + version.stderr
    help_text = subprocess.run([str(KUBEDOCK), "server", "--help"], capture_output=True, text=True, timeout=30)
    assert "--disable-services" in help_text.stdout + help_text.stderr
