#!/usr/bin/env bash
# Print the path of helm HELM_VERSION, building it once from the Go module proxy into the
# cache (CLAVE_CACHE, default ~/.cache/clave) if it is not there yet. Used by
# `make deploy-check` and by tests/unit/test_deploy_files.py; needs Go 1.24+.
# A cold build takes about 1.5 minutes (downloads and compile); a cached one nothing.
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v3.22.0}
BIN_DIR=${CLAVE_CACHE:-$HOME/.cache/clave}/bin
HELM=$BIN_DIR/helm-$HELM_VERSION

if [[ ! -x $HELM ]]; then
  command -v go >/dev/null || { echo "ensure_helm: go not found (needed once to build helm $HELM_VERSION)" >&2; exit 1; }
  mkdir -p "$BIN_DIR"
  (
    # One build at a time, even with parallel callers.
    flock 9
    if [[ ! -x $HELM ]]; then
      echo "ensure_helm: building helm $HELM_VERSION into $BIN_DIR (once)" >&2
      tmp=$(mktemp -d)
      trap 'rm -rf "$tmp"' EXIT
      GOBIN=$tmp GOFLAGS=-buildvcs=false go install -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
      mv "$tmp/helm" "$HELM"
    fi
  ) 9>"$BIN_DIR/.helm.lock"
fi
echo "$HELM"
