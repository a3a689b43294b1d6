#!/usr/bin/env bash
# Builds the Go tools the tests and benchmarks need (kube-apiserver, and on request etcd, coredns,
# helm, kubectl, Docker Compose, the Prometheus server and promtool, and the node components
# kubelet, kube-proxy, kube-controller-manager, kube-scheduler) from the Go module proxy into
# ~/.cache/kubedock-dns/<tool>-<version>/, and prints the path of each binary.  Nothing is built
# inside the repository and nothing built is ever committed.  `prometheus-operator-crds` builds
# nothing: it takes the Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule)
# from its Go module and prints their directory.  The two Testcontainers clients of the
# real-kubedock tests are built the same way: testcontainers-go (our program in
# testbed/clients/tcgo, its module from the proxy) and testcontainers-java (testbed/clients/java
# with Maven; its local repository is ~/.cache/kubedock-dns/m2); each prints one executable.
#
#   scripts/build-tools.sh kube-apiserver [etcd] [coredns] [helm] [promtool] [prometheus] [kube-node] [kube-network-policies]
#                          [kube-router] [prometheus-operator-crds] [kubectl] [compose] [testcontainers-go] [testcontainers-java]
#
# `kube-node` builds the four node components from the same k8s.io/kubernetes module and version as
# kube-apiserver, in one `go build` so they share every compiled package.
#
# A binary already in the cache is reused, so reruns take no time.  Versions are pinned here and
# can be overridden by environment variables of the same name (KUBE_VERSION=v1.36.3 ...).
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.6}
COREDNS_VERSION=${COREDNS_VERSION:-v1.13.1}
HELM_VERSION=${HELM_VERSION:-v3.19.0}
# Prometheus tags its Go module v0.3XY.Z for release 3.XY.Z.
PROMTOOL_VERSION=${PROMTOOL_VERSION:-v0.316.0}
KNP_VERSION=${KNP_VERSION:-v0.8.0}
# The only v2 release the module proxy serves here; security flaws are reported against it, so it is
# a TEST-BED engine only (loopback, throw-away node), never shipped or recommended.
KUBE_ROUTER_VERSION=${KUBE_ROUTER_VERSION:-v2.1.0}
# The CRDs the chart's ServiceMonitor, PodMonitor and PrometheusRule are validated against.
PROMETHEUS_OPERATOR_VERSION=${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}
# Compose v2.40.x: the last line that talks to kubedock 0.22.0 (which announces Docker API 1.25;
# Compose v5 refuses it).
COMPOSE_VERSION=${COMPOSE_VERSION:-v2.40.3}
CACHE=${KUBEDOCK_DNS_CACHE:-$HOME/.cache/kubedock-dns}
REPO=$(cd "$(dirname "$0")/.." && pwd)

export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

say() { printf 'build-tools: %s\n' "$*" >&2; }

# A scratch module that requires $1@$2 and builds package $3 into $4.  Extra go.mod lines on stdin.
# $3 may name several packages (space-separated); $4 is then a directory that receives one binary
# per package, named after its last path element.
build_in_scratch_module() {
    local module=$1 version=$2 package=$3 out=$4 ldflags=${5:-}
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/kubedock-dns-build.XXXXXX")
    trap 'rm -rf "$work"; trap - RETURN' RETURN
    {
        printf 'module kubedock-dns.local/build\n\ngo 1.24\n\nrequire %s %s\n' "$module" "$version"
        cat
    } > "$work/go.mod"
    say "resolving $module@$version (first run downloads modules: a few minutes)"
    local pkg
    for pkg in $package; do
        (cd "$work" && go get "$pkg@$version" >&2)
    done
    (cd "$work" && go mod download >&2)
    say "compiling $package (a cold build of kube-apiserver takes 10-15 minutes on 2 cores)"
    mkdir -p "$(dirname "$out")"
    if [ "$package" = "${package%% *}" ]; then
        (cd "$work" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$package" >&2)
    else
        rm -rf "$out.tmp" && mkdir -p "$out.tmp"
        # shellcheck disable=SC2086 # $package is a list of packages
        (cd "$work" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp/" $package >&2)
    fi
    mv "$out.tmp" "$out"
}

# k8s.io/kubernetes points its staging modules at ./staging/src; outside its repo they must be
# replaced by the published v0.x.y twins.  Take the list from the published go.mod, not by hand.
staging_replacements() {
    local version=$1 gomod
    gomod=$(cd "$(mktemp -d)" && go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    local minor=${version#v1.}
    sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$gomod" |
        while read -r m; do printf 'replace %s => %s v0.%s\n' "$m" "$m" "$minor"; done
}

kube_version_flags() {
    local v=k8s.io/component-base/version
    echo "-X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2) -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
}

build_kube_apiserver() {
    local out=$CACHE/kube-apiserver-$KUBE_VERSION/kube-apiserver
    if [ ! -x "$out" ]; then
        staging_replacements "$KUBE_VERSION" |
            build_in_scratch_module k8s.io/kubernetes "$KUBE_VERSION" k8s.io/kubernetes/cmd/kube-apiserver "$out" "$(kube_version_flags)"
    fi
    echo "$out"
}

# kubelet, kube-proxy, kube-controller-manager and kube-scheduler: one directory keyed by version,
# filled by one `go build` (after kube-apiserver, most of their packages are already compiled).
KUBE_NODE_COMPONENTS="kubelet kube-proxy kube-controller-manager kube-scheduler"
build_kube_node() {
    local dir=$CACHE/kube-node-$KUBE_VERSION complete=1 c
    for c in $KUBE_NODE_COMPONENTS; do [ -x "$dir/$c" ] || complete=0; done
    if [ "$complete" = 0 ]; then
        local packages=""
        for c in $KUBE_NODE_COMPONENTS; do packages="$packages k8s.io/kubernetes/cmd/$c"; done
        rm -rf "$dir"
        staging_replacements "$KUBE_VERSION" |
            (build_in_scratch_module k8s.io/kubernetes "$KUBE_VERSION" "${packages# }" "$dir" "$(kube_version_flags)")
    fi
    for c in $KUBE_NODE_COMPONENTS; do echo "$dir/$c"; done
}

build_etcd() {
    local out=$CACHE/etcd-$ETCD_VERSION/etcd
    if [ ! -x "$out" ]; then
        build_in_scratch_module go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 "$out" </dev/null
    fi
    echo "$out"
}

build_coredns() {
    local out=$CACHE/coredns-$COREDNS_VERSION/coredns
    if [ ! -x "$out" ]; then
        # In a subshell: the RETURN trap build_in_scratch_module sets would otherwise fire again when
        # this function returns, where its local $work is unbound (set -u), and fail the run.
        (build_in_scratch_module github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns "$out" </dev/null)
    fi
    echo "$out"
}

build_helm() {
    local out=$CACHE/helm-$HELM_VERSION/helm
    if [ ! -x "$out" ]; then
        # Like helm's Makefile: the Kubernetes version `helm template`/`helm lint` assume (and check
        # a chart's kubeVersion against) is client-go's minor + 1.x; unset it would be v1.20.0.
        local gomod client_go major minor
        gomod=$(cd "$(mktemp -d)" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
        client_go=$(sed -n 's#^\s*k8s\.io/client-go v\([0-9]*\)\.\([0-9]*\)\..*#\1 \2#p' "$gomod")
        read -r major minor <<<"$client_go"
        major=$((major + 1))
        local flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
        local pkg
        for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
            flags="$flags -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
        done
        build_in_scratch_module helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$out" "$flags" </dev/null
    fi
    echo "$out"
}

build_promtool() {
    local out=$CACHE/promtool-$PROMTOOL_VERSION/promtool
    if [ ! -x "$out" ]; then
        # promtool checks the chart's PrometheusRule groups (promtool check rules, test rules).
        (build_in_scratch_module github.com/prometheus/prometheus "$PROMTOOL_VERSION" \
            github.com/prometheus/prometheus/cmd/promtool "$out" </dev/null)
    fi
    echo "$out"
}

# The Prometheus server, from the same module and version as promtool (most packages are already
# compiled): the node test's Prometheus finds the chart's pods through Kubernetes service discovery,
# which Debian's prometheus package is built without.  No web UI assets (only the HTTP API is used).
build_prometheus() {
    local out=$CACHE/prometheus-$PROMTOOL_VERSION/prometheus
    if [ ! -x "$out" ]; then
        (build_in_scratch_module github.com/prometheus/prometheus "$PROMTOOL_VERSION" \
            github.com/prometheus/prometheus/cmd/prometheus "$out" </dev/null)
    fi
    echo "$out"
}

# kubectl from the same k8s.io/kubernetes module and version as the API server (its packages are
# mostly compiled already): the node bed's `kubectl exec`/`port-forward` and the docs' commands.
build_kubectl() {
    local out=$CACHE/kubectl-$KUBE_VERSION/kubectl
    if [ ! -x "$out" ]; then
        staging_replacements "$KUBE_VERSION" |
            (build_in_scratch_module k8s.io/kubernetes "$KUBE_VERSION" k8s.io/kubernetes/cmd/kubectl "$out" "$(kube_version_flags)")
    fi
    echo "$out"
}

# Docker Compose (standalone `docker-compose`, which needs no docker CLI), talking to kubedock.
build_compose() {
    local out=$CACHE/compose-$COMPOSE_VERSION/docker-compose
    if [ ! -x "$out" ]; then
        (build_in_scratch_module github.com/docker/compose/v2 "$COMPOSE_VERSION" github.com/docker/compose/v2/cmd "$out" \
            "-X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" </dev/null)
    fi
    echo "$out"
}

# testbed/clients/tcgo: a testcontainers-go suite of ours, built in a scratch copy (go.sum made
# there), keyed by its source, so an edit rebuilds it and a rerun takes no time.
build_testcontainers_go() {
    local src=$REPO/testbed/clients/tcgo version key
    version=$(sed -n 's#^require github.com/testcontainers/testcontainers-go \(v[^ ]*\)#\1#p' "$src/go.mod")
    key=$(cat "$src/go.mod" "$src/main.go" | sha256sum | cut -c1-12)
    local out=$CACHE/testcontainers-go-$version-$key/tcgo
    if [ ! -x "$out" ]; then
        (
            work=$(mktemp -d "${TMPDIR:-/tmp}/kubedock-dns-build.XXXXXX")
            trap 'rm -rf "$work"' EXIT
            cp "$src/go.mod" "$src/main.go" "$work/"
            say "building testcontainers-go $version client (first run downloads modules: a few minutes)"
            cd "$work" && go mod tidy >&2 && mkdir -p "$(dirname "$out")" &&
                go build -trimpath -ldflags "-s -w" -o "$out.tmp" . >&2 && mv "$out.tmp" "$out"
        )
    fi
    echo "$out"
}

# testbed/clients/java: the Testcontainers-Java client, compiled by Maven into the cache (keyed by
# its source) with its dependencies' class path; prints a launcher that runs it with `java`.
build_testcontainers_java() {
    local src=$REPO/testbed/clients/java version key
    command -v mvn >/dev/null && command -v java >/dev/null ||
        { say "testcontainers-java needs java (17 or newer) and mvn (Debian: openjdk-17-jdk-headless maven)"; return 1; }
    version=$(sed -n 's#.*<testcontainers.version>\(.*\)</testcontainers.version>.*#\1#p' "$src/pom.xml")
    key=$(find "$src" -type f \( -name pom.xml -o -name '*.java' \) | sort | xargs cat | sha256sum | cut -c1-12)
    local dir=$CACHE/testcontainers-java-$version-$key
    if [ ! -x "$dir/run" ]; then
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        say "building the Testcontainers-Java $version client with Maven (first run downloads its dependencies)"
        mvn -B -q -f "$src/pom.xml" -Dmaven.repo.local="$CACHE/m2" -Dkdn.build="$dir.tmp" \
            compile dependency:build-classpath -Dmdep.outputFile="$dir.tmp/classpath" >&2
        printf '#!/bin/sh\n# Testcontainers-Java %s client (testbed/clients/java), built by scripts/build-tools.sh\nexec java ${JAVA_OPTIONS:-} -cp "%s/classes:$(cat "%s/classpath")" kubedockdns.HostAccessSession "$@"\n' \
            "$version" "$dir" "$dir" > "$dir.tmp/run"
        chmod 755 "$dir.tmp/run"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    echo "$dir/run"
}

# kube-network-policies: a NetworkPolicy engine (nftables + nfqueue) for the real node's
# isolation tests (--network-policies).
build_kube_network_policies() {
    local out=$CACHE/kube-network-policies-$KNP_VERSION/kube-network-policies
    if [ ! -x "$out" ]; then
        (build_in_scratch_module sigs.k8s.io/kube-network-policies "$KNP_VERSION" \
            sigs.k8s.io/kube-network-policies/cmd "$out" </dev/null)
    fi
    echo "$out"
}

# kube-router: its network-policy controller (iptables + ipset, no nfqueue) is the engine the real
# node's isolation tests run on kernels without nftables' queue statement.
build_kube_router() {
    local out=$CACHE/kube-router-$KUBE_ROUTER_VERSION/kube-router
    if [ ! -x "$out" ]; then
        (build_in_scratch_module github.com/cloudnativelabs/kube-router/v2 "$KUBE_ROUTER_VERSION" \
            github.com/cloudnativelabs/kube-router/v2/cmd/kube-router "$out" \
            "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" </dev/null)
    fi
    echo "$out"
}

# The Prometheus Operator's own CRD manifests (read from its module's example/ directory, as
# published), copied into the cache; the repository never holds them.
PROMETHEUS_OPERATOR_CRDS="servicemonitors podmonitors prometheusrules"
fetch_prometheus_operator_crds() {
    local dir=$CACHE/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION complete=1 crd
    for crd in $PROMETHEUS_OPERATOR_CRDS; do
        [ -s "$dir/monitoring.coreos.com_$crd.yaml" ] || complete=0
    done
    if [ "$complete" = 0 ]; then
        local work module
        work=$(mktemp -d "${TMPDIR:-/tmp}/kubedock-dns-crds.XXXXXX")
        say "downloading github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION for its CRDs"
        module=$(cd "$work" && go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
            sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
        rm -rf "$work" "$dir.tmp" && mkdir -p "$dir.tmp"
        for crd in $PROMETHEUS_OPERATOR_CRDS; do
            cp "$module/example/prometheus-operator-crd-full/monitoring.coreos.com_$crd.yaml" "$dir.tmp/"
        done
        chmod 0644 "$dir.tmp"/*.yaml
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    echo "$dir"
}

[ $# -gt 0 ] || set -- kube-apiserver
# One build at a time per cache: parallel test sessions would otherwise compile twice.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build-tools.lock"
flock 9
for tool in "$@"; do
    case $tool in
        kube-apiserver) build_kube_apiserver ;;
        etcd) build_etcd ;;
        coredns) build_coredns ;;
        helm) build_helm ;;
        promtool) build_promtool ;;
        prometheus) build_prometheus ;;
        kube-node) build_kube_node ;;
        kube-network-policies) build_kube_network_policies ;;
        kube-router) build_kube_router ;;
        prometheus-operator-crds) fetch_prometheus_operator_crds ;;
        kubectl) build_kubectl ;;
        compose) build_compose ;;
        testcontainers-go) build_testcontainers_go ;;
        testcontainers-java) build_testcontainers_java ;;
        *) say "unknown tool '$tool' (expected kube-apiserver, etcd, coredns, helm, promtool, prometheus, kube-node, kube-network-policies, kube-router, prometheus-operator-crds, kubectl, compose, testcontainers-go or testcontainers-java)"; exit 2 ;;
    esac
done
