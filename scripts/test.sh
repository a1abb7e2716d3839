#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the in-process and process-level integration
# tests, and the etcdctl suite. Installs what the tests need from Debian's packages first
# (etcdctl 3.4, etcd 3.4, protoc) if any of it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

export ETCDCTL_API=3
# Two cores: keep test binaries from fighting over them more than necessary.
cargo test --workspace --all-targets --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"
