#!/usr/bin/env bash
# Start a group of compose.yaml services: minimal, data, vector, ml or full.
#   minimal  Postgres, MLflow (artifacts in a volume), Dagster user code, webserver, daemon;
#            vectors in the embedded store
#   data     minimal + ClickHouse
#   vector   minimal + the Qdrant server (the lab switches to it)
#   ml       minimal + MinIO as MLflow's artifact store
#   full     everything
# Extra arguments go to `docker compose up` (default: -d --build --wait).
# Without Docker, `dagma services up` runs the same topology as local processes.
set -euo pipefail
cd "$(dirname "$0")/.."

group="${1:-minimal}"
shift || true
[[ -f .env ]] || { echo "No .env: cp .env.example .env, then change every password." >&2; exit 2; }

profiles=()
case "$group" in
  minimal) ;;
  data) profiles=(data) ;;
  vector) profiles=(vector) ;;
  ml) profiles=(ml) ;;
  full) profiles=(full) ;;
  *) echo "usage: $0 minimal|data|vector|ml|full [docker compose up args]" >&2; exit 2 ;;
esac

if [[ "$group" == vector || "$group" == full ]]; then
  export DAGMA_COMPOSE_QDRANT_URL="http://qdrant:6333"
fi
if [[ "$group" == ml || "$group" == full ]]; then
  export DAGMA_COMPOSE_ARTIFACTS="s3://mlflow"
fi

compose=(docker compose)
if ! docker compose version >/dev/null 2>&1; then
  command -v docker-compose >/dev/null || { echo "Install Docker Compose v2." >&2; exit 2; }
  compose=(docker-compose)
fi
args=()
for p in "${profiles[@]}"; do args+=(--profile "$p"); done
[[ $# -gt 0 ]] || set -- -d --build --wait
"${compose[@]}" "${args[@]}" up "$@"
echo "Dagster UI: http://127.0.0.1:${DAGMA_DAGSTER_PORT:-53000}  MLflow: http://127.0.0.1:${DAGMA_MLFLOW_PORT:-55000}"
