#!/usr/bin/env bash
# Builds fully static release binaries and one FROM-scratch image per service (platform/<name>:dev).
# Needs no image registry: the build context holds only our binaries. Safe to run again: cargo
# rebuilds only what changed, and an unchanged binary gives the same image.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
BINS=(coordinator registry-svc config-svc lb-gateway demo-svc)
command -v cargo >/dev/null || { echo "error: cargo is not installed (https://rustup.rs)" >&2; exit 1; }
command -v docker >/dev/null || { echo "error: docker is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: cannot reach the Docker engine (is it running, may this user use it?)" >&2; exit 1; }
echo "==> building static binaries (${BINS[*]}); the first build takes several minutes"
args=()
for b in "${BINS[@]}"; do args+=(-p "$b" --bin "$b"); done
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target "$TARGET" "${args[@]}"
TD=${CARGO_TARGET_DIR:-target}
ctx=$TD/image-context
rm -rf "$ctx" && mkdir -p "$ctx"
for b in "${BINS[@]}"; do
  cp "$TD/$TARGET/release/$b" "$ctx/$b"
  # Debug info stays in target/ for profiling; images carry stripped binaries.
  if command -v strip >/dev/null; then strip --strip-debug "$ctx/$b"; fi
done
for b in "${BINS[@]}"; do
  echo "==> image platform/$b:dev"
  DOCKER_BUILDKIT=0 docker build -q -f compose/Dockerfile --build-arg BIN="$b" -t "platform/$b:dev" "$ctx" >/dev/null
done
docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^platform/'
