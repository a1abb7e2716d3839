#!/usr/bin/env bash
# Fuzzes every parser we own for a bounded time: libFuzzer (coverage-guided) over the targets in
# fuzz/ (see fuzz/README.md). FUZZ_SECONDS per target (default 20); FUZZ=skip skips it all (it
# says so). FUZZ_TARGETS="a b" runs only those. FUZZ_TIMEOUT bounds the whole step, build
# included (default 900 s): past it, the step fails and says so.
#
# Before fuzzing, every input kept in fuzz/artifacts/<target>/ (the inputs that once crashed a
# target) is replayed: they are regression tests. A new crash fails the run and leaves its input
# there, to be fixed and kept (see fuzz/README.md).
#
# Built with plain cargo, not cargo-fuzz (whose `cargo install` alone took minutes of CI): the
# flags below are the ones `cargo fuzz build -s none` passes, all stable. LLVM's sancov passes
# instrument the code for coverage; libfuzzer-sys builds libFuzzer (C++) and links it in.
# `--target` keeps RUSTFLAGS off build scripts and proc macros (they run in the build, without
# libFuzzer). No sanitizer (they need nightly): our crates forbid `unsafe`, and Rust's own checks
# (bounds; overflow and debug assertions, on in the `fuzz` profile) report what a sanitizer
# would. The targets depend on the small crates that hold the parsers, not on the services, so
# the build is a few minutes (fuzz/Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${FUZZ:-} == skip ]]; then
  echo "fuzz: skipped (FUZZ=skip)"
  exit 0
fi

# libFuzzer is C++, built by libfuzzer-sys with the system compiler.
command -v c++ >/dev/null || { echo "fuzz: no C++ compiler (scripts/install-deps.sh installs g++)"; exit 1; }

secs=${FUZZ_SECONDS:-20}
budget=${FUZZ_TIMEOUT:-900}
read -r -a targets <<<"${FUZZ_TARGETS:-config_formats routes_file registry_inputs wal_records raft_command}"
root=$PWD
host=$(rustc -vV | sed -n 's/^host: //p')
bindir=$root/fuzz/target/$host/fuzz
logs=$root/fuzz/target/logs

# Seconds left of the step's budget (at least 1, so `timeout` is never given 0 = no limit).
left() {
  local l=$((budget - SECONDS))
  ((l > 0)) && echo "$l" || echo 1
}

flags=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
)
export RUSTFLAGS="${flags[*]}"

echo "fuzz: building ${#targets[@]} target(s)"
rc=0
timeout "$(left)" cargo build --locked --manifest-path fuzz/Cargo.toml --target "$host" \
  --profile fuzz --bins || rc=$?
if ((rc == 124)); then
  echo "fuzz: FAILED: the build did not finish inside FUZZ_TIMEOUT=$budget s"
  exit 1
elif ((rc != 0)); then
  echo "fuzz: FAILED: the build failed"
  exit 1
fi
echo "fuzz: built in $SECONDS s"
mkdir -p "$logs"

failed=()
for t in "${targets[@]}"; do
  corpus=$root/fuzz/corpus/$t
  seeds=$root/fuzz/seeds/$t
  artifacts=$root/fuzz/artifacts/$t
  mkdir -p "$corpus" "$seeds" "$artifacts"
  bin=$bindir/$t
  kept=("$artifacts"/*)
  if [[ -e ${kept[0]} ]]; then
    echo "fuzz: $t: replaying ${#kept[@]} kept input(s)"
    if ! timeout "$(left)" "$bin" -runs=1 "${kept[@]}" >"$logs/$t-replay.log" 2>&1; then
      tail -n 30 "$logs/$t-replay.log"
      failed+=("$t (a kept input crashes again)")
      continue
    fi
  fi
  # Never past the step's budget: the last targets get what is left (at least 1 s each).
  run=$secs
  if (($(left) - 5 < run)); then
    run=$(($(left) - 5))
    ((run > 0)) || run=1
  fi
  echo "fuzz: $t: fuzzing for $run s"
  # -timeout: one input taking over 10 s is a hang, and a finding; -rss_limit_mb: likewise 2 GiB.
  # `timeout` is the backstop should libFuzzer itself not stop.
  rc=0
  timeout "$((run + 30))" "$bin" "$corpus" "$seeds" -max_total_time="$run" -timeout=10 \
    -rss_limit_mb=2048 -artifact_prefix="$artifacts/" -print_final_stats=1 \
    >"$logs/$t.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    tail -n 40 "$logs/$t.log"
    if ((rc == 124)); then
      failed+=("$t (did not stop after $run s)")
    else
      failed+=("$t (new crash: see fuzz/artifacts/$t/)")
    fi
    continue
  fi
  grep -E '^stat::number_of_executed_units|^Done' "$logs/$t.log" | tr '\n' ' '
  echo
done

if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'fuzz: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed, in $SECONDS s"
