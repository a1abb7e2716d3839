#!/usr/bin/env bash
# Builds everything the stack needs (static binaries, images), starts it in the background with
# docker compose (v2) or docker-compose (v1), and waits until every container is healthy.
# Extra arguments go to `compose up -d` (e.g. a service name).
# Stop it with:  scripts/compose.sh -p platform -f compose/docker-compose.yml down   (-v drops data)
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT="${COMPOSE_PROJECT_NAME:-platform}"
FILE=compose/docker-compose.yml
TIMEOUT="${UP_TIMEOUT:-120}"
bash scripts/build-images.sh
echo "==> starting project $PROJECT ($FILE)"
start=$SECONDS
bash scripts/compose.sh -p "$PROJECT" -f "$FILE" up -d "$@"
expected=$(bash scripts/compose.sh -p "$PROJECT" -f "$FILE" config --services | wc -l)
echo "==> waiting for all $expected containers to be healthy (at most ${TIMEOUT}s after the start)"
last=""
while :; do
  states=$(docker ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}} {{.Status}}' | sort)
  healthy=$(grep -c '(healthy)' <<<"$states" || true)
  line="    $((SECONDS - start))s: $healthy/$expected healthy"
  if [[ $line != "$last" ]]; then echo "$line"; last=$line; fi
  if ((healthy >= expected)); then
    echo "$states" | sed 's/^/    /'
    break
  fi
  if grep -q 'Exited' <<<"$states"; then
    echo "error: a container exited:" >&2
    grep 'Exited' <<<"$states" >&2
    echo "see: scripts/compose.sh -p $PROJECT -f $FILE logs <service>" >&2
    exit 1
  fi
  if ((SECONDS - start > TIMEOUT)); then
    echo "error: not all healthy after ${TIMEOUT}s:" >&2
    echo "$states" >&2
    exit 1
  fi
  sleep 1
done
echo "==> all healthy $((SECONDS - start))s after the start. Try:"
echo "    curl -s 127.0.0.1:8080/users/alice        # through lb-gateway to a demo instance"
echo "    ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:2379 endpoint status -w table"
echo "    (the tour is in README.md and compose/README.md)"
