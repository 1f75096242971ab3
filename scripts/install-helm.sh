#!/usr/bin/env bash
# Install the pinned helm into the tools cache, unless it is there already, and print its path.
#
#   HELM="$(scripts/install-helm.sh)" && "$HELM" lint helm/vecpipe
#
# helm is built from source with `go install` through the Go module proxy (the first build takes
# a few minutes; later calls return at once). Only the path goes to stdout; progress to stderr.
# VECPIPE_TOOLS moves the cache (default ~/.cache/vecpipe/tools); HELM_VERSION overrides the pin.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.21.4}"
TOOLS="${VECPIPE_TOOLS:-${HOME}/.cache/vecpipe/tools}"
HELM_BIN="${TOOLS}/bin/helm"

# `go version -m` reads the module version stamped into the binary: a changed pin rebuilds.
installed_version() {
    go version -m "$1" 2>/dev/null | awk '$1 == "mod" && $2 == "helm.sh/helm/v3" { print $3 }'
}

if [ -x "${HELM_BIN}" ] && { ! command -v go >/dev/null 2>&1 \
        || [ "$(installed_version "${HELM_BIN}")" = "${HELM_VERSION}" ]; }; then
    echo "${HELM_BIN}"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "install-helm.sh: building helm ${HELM_VERSION} needs Go 1.26 or later (go install)," \
         "and there is no 'go' on PATH; install Go, or put a helm binary at ${HELM_BIN}." >&2
    exit 1
fi

mkdir -p "${TOOLS}/bin"
echo "install-helm.sh: building helm ${HELM_VERSION} into ${TOOLS}/bin (go install)..." >&2
started=${SECONDS}
# The link flags of helm's own Makefile: without them `helm version` says only v3.NN and
# `helm template` assumes Kubernetes 1.20 (so a chart's kubeVersion >= 1.25 would not render).
# The Kubernetes version is the one of the client-go that this helm release builds with.
gomod="$(go mod download -json "helm.sh/helm/v3@${HELM_VERSION}" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
client_go="$(awk '$1 == "k8s.io/client-go" { print $2 }' "${gomod}")"   # e.g. v0.36.2
k8s_minor="$(echo "${client_go}" | cut -d. -f2)"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
if [ -n "${k8s_minor}" ]; then
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags="${ldflags} -X ${pkg}.k8sVersionMajor=1 -X ${pkg}.k8sVersionMinor=${k8s_minor}"
    done
fi
GOBIN="${TOOLS}/bin" go install -ldflags="${ldflags}" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" >&2
echo "install-helm.sh: helm ${HELM_VERSION} built in $((SECONDS - started)) s" >&2
echo "${HELM_BIN}"
