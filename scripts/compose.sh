#!/usr/bin/env bash
# Runs docker compose with whichever of `docker compose` (v2) and `docker-compose` (v1) exists.
set -euo pipefail
if docker compose version >/dev/null 2>&1; then
  exec docker compose "$@"
elif command -v docker-compose >/dev/null; then
  exec docker-compose "$@"
else
  echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi
