#!/usr/bin/env bash
# Builds fully static release binaries and one FROM-scratch image per service. Needs no image
# registry: the build context holds only our binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
BINS=(coordinator registry-svc config-svc lb-gateway)
echo "==> building static binaries (${BINS[*]})"
pkgs=()
for b in "${BINS[@]}"; do pkgs+=(-p "$b"); done
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target "$TARGET" "${pkgs[@]}" --bins
ctx=target/image-context
rm -rf "$ctx" && mkdir -p "$ctx"
for b in "${BINS[@]}"; do
  cp "target/$TARGET/release/$b" "$ctx/$b"
  # Debug info stays in target/ for profiling; images carry stripped binaries.
  if command -v strip >/dev/null; then strip --strip-debug "$ctx/$b"; fi
done
for b in "${BINS[@]}"; do
  echo "==> image platform/$b:dev"
  DOCKER_BUILDKIT=0 docker build -q -f compose/Dockerfile --build-arg BIN="$b" -t "platform/$b:dev" "$ctx" >/dev/null
done
docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^platform/'
