#!/usr/bin/env bash
# Fuzzes every parser we own for a bounded time: `cargo fuzz` (libFuzzer, coverage-guided) over
# the targets in fuzz/ (see fuzz/README.md). FUZZ_SECONDS per target (default 20); FUZZ=skip
# skips it all (it says so). FUZZ_TARGETS="a b" runs only those.
#
# Before fuzzing, every input kept in fuzz/artifacts/<target>/ (the inputs that once crashed a
# target) is replayed: they are regression tests. A new crash fails the run and leaves its input
# there, to be fixed and kept (see fuzz/README.md).
#
# Stable toolchain: `-s none` builds without a sanitizer (sanitizers need nightly's -Zsanitizer).
# The coverage instrumentation (LLVM's sancov passes, `-Cpasses` / `-Cllvm-args`) is stable, so
# the fuzzing is still coverage-guided; safe Rust's own checks (bounds, overflow: cargo fuzz
# builds with debug assertions) report what a sanitizer would in code without `unsafe`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${FUZZ:-} == skip ]]; then
  echo "fuzz: skipped (FUZZ=skip)"
  exit 0
fi

CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
# libFuzzer is C++, built by libfuzzer-sys with the system compiler.
command -v c++ >/dev/null || { echo "fuzz: no C++ compiler (scripts/install-deps.sh installs g++)"; exit 1; }

secs=${FUZZ_SECONDS:-20}
read -r -a targets <<<"${FUZZ_TARGETS:-config_formats routes_file registry_inputs wal_records raft_command}"
root=$PWD

start=$SECONDS
# 16 codegen units and opt-level 1 (fuzz/Cargo.toml): the build is most of the time spent here.
cargo fuzz build -s none --codegen-units 16
echo "fuzz: built in $((SECONDS - start)) s"

failed=()
for t in "${targets[@]}"; do
  corpus=$root/fuzz/corpus/$t
  seeds=$root/fuzz/seeds/$t
  artifacts=$root/fuzz/artifacts/$t
  mkdir -p "$corpus" "$seeds" "$artifacts"
  bin=$root/fuzz/target/x86_64-unknown-linux-gnu/release/$t
  kept=("$artifacts"/*)
  if [[ -e ${kept[0]} ]]; then
    echo "fuzz: $t: replaying ${#kept[@]} kept input(s)"
    if ! "$bin" -runs=1 "${kept[@]}" >"$root/fuzz/target/$t-replay.log" 2>&1; then
      tail -n 30 "$root/fuzz/target/$t-replay.log"
      failed+=("$t (a kept input crashes again)")
      continue
    fi
  fi
  echo "fuzz: $t: fuzzing for $secs s"
  # -timeout: one input taking over 10 s is a hang, and a finding; -rss_limit_mb: likewise 2 GiB.
  if ! "$bin" "$corpus" "$seeds" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$artifacts/" -print_final_stats=1 >"$root/fuzz/target/$t.log" 2>&1; then
    tail -n 40 "$root/fuzz/target/$t.log"
    failed+=("$t (new crash: see fuzz/artifacts/$t/)")
    continue
  fi
  grep -E '^stat::number_of_executed_units|^Done' "$root/fuzz/target/$t.log" | tr '\n' ' '
  echo
done

if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'fuzz: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
