#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the in-process and process-level integration
# tests, the etcdctl suite, and the fault tests across containers (fault-tests). Installs what
# the tests need from Debian's packages first (etcdctl 3.4, etcd 3.4, protoc) if any of it is
# missing, and builds the images the fault tests run (scripts/build-images.sh) when a Docker
# engine answers. FAULT_TESTS=skip skips the fault tests (they say so). Then every
# parser is fuzzed for a bounded time (scripts/fuzz.sh; FUZZ=skip skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

if [[ ${FAULT_TESTS:-} != skip ]] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  bash scripts/build-images.sh
fi

export ETCDCTL_API=3
# Two cores: keep test binaries from fighting over them more than necessary.
# coordinator/tests/sim runs the deterministic simulation of the Raft stack over 500 seeds here:
# .cargo/config.toml builds with `--cfg tokio_unstable`, so each seed replays exactly.
cargo test --workspace --all-targets --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"

# Bounded fuzzing of the parsers (scripts/fuzz.sh: FUZZ_SECONDS per target, default 20; the
# whole step, build included, bounded by FUZZ_TIMEOUT). FUZZ=skip skips it (it says so).
bash scripts/fuzz.sh
