#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the in-process and process-level integration
# tests, the etcdctl suite, and the fault tests across containers (fault-tests). Installs what
# the tests need from Debian's packages first (etcdctl 3.4, etcd 3.4, protoc) if any of it is
# missing, and builds the images the fault tests run (scripts/build-images.sh) when a Docker
# engine answers. FAULT_TESTS=skip skips the fault tests (they say so).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

if [[ ${FAULT_TESTS:-} != skip ]] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  bash scripts/build-images.sh
fi

export ETCDCTL_API=3
# Two cores: keep test binaries from fighting over them more than necessary.
cargo test --workspace --all-targets --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"

# The deterministic simulation of the coordinator's Raft stack, 500 seeds, built with
# `--cfg tokio_unstable` so that each seed also fixes tokio's own randomness (the branch order
# of select!): a failing seed then replays exactly. Its own target dir, as the flag changes
# every crate. SIM_EXACT=skip skips it (the workspace run above ran a few seeds without it).
if [[ ${SIM_EXACT:-} != skip ]]; then
  RUSTFLAGS="--cfg tokio_unstable" cargo test -p coordinator --test sim \
    --target-dir target/sim-exact -- --test-threads="${TEST_THREADS:-4}"
fi
