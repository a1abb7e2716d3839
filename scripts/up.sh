#!/usr/bin/env bash
# Builds everything the stack needs (static binaries, images) and starts it in the background.
# Stop it with: scripts/compose.sh -p platform -f compose/docker-compose.yml down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-images.sh
PROJECT="${COMPOSE_PROJECT_NAME:-platform}"
bash scripts/compose.sh -p "$PROJECT" -f compose/docker-compose.yml up -d "$@"
echo "==> waiting for every container to be healthy"
deadline=$((SECONDS + 120))
while :; do
  states=$(docker ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}} {{.Status}}')
  if [ -n "$states" ] && ! grep -qv '(healthy)' <<<"$states"; then
    echo "$states"
    break
  fi
  if [ $SECONDS -gt $deadline ]; then
    echo "not healthy after 120 s:" >&2
    echo "$states" >&2
    exit 1
  fi
  sleep 2
done
echo "==> ready: ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:2379 put hello world"
