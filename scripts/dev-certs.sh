#!/usr/bin/env bash
# Writes a development CA and a certificate/key pair per service (rcgen, no OpenSSL) into DIR
# (default compose/certs), for compose/docker-compose.tls.yml and local runs. Development only.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-compose/certs}"
cargo run --quiet -p service-kit --bin devcerts -- "$dir"
