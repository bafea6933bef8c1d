#!/usr/bin/env bash
# Start a group of compose.yaml services: minimal, data, vector, ml, gateway or full.
#   minimal  Postgres, MLflow (artifacts in a volume), Dagster user code, webserver, daemon;
#            vectors in the embedded store
#   data     minimal + ClickHouse
#   vector   minimal + the Qdrant server (the lab switches to it)
#   ml       minimal + MinIO as MLflow's artifact store
#   gateway  minimal + the API and Traefik (TLS, forward-auth) in front of it and the UIs;
#            the UIs without a login of their own publish no port then
#   full     everything, gateway included
# Extra arguments go to `docker compose up` (default: -d --build --wait).
# Without Docker, `dagma services up` runs the same topology as local processes.
set -euo pipefail
cd "$(dirname "$0")/.."

group="${1:-minimal}"
shift || true
init="dagma secrets init (without the venv: PYTHONPATH=src python3 -m dagma.env_secrets init .env)"
[[ -f .env ]] || { echo "No .env: write one with random secrets: $init" >&2; exit 2; }
# Refuse secrets everyone knows (change-me..., empty, .env.example's). The list and the rules
# live in src/dagma/env_secrets.py (standard library only), so the host needs Python 3.8+ only.
python=""
for candidate in python3 python; do
  if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 8))' >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
[[ -n "$python" ]] || { echo "start_env.sh needs Python 3.8+ (python3) to check .env's secrets." >&2; exit 2; }
PYTHONPATH=src "$python" -B -m dagma.env_secrets check .env

profiles=()
case "$group" in
  minimal) ;;
  data) profiles=(data) ;;
  vector) profiles=(vector) ;;
  ml) profiles=(ml) ;;
  gateway) profiles=(gateway) ;;
  full) profiles=(full) ;;
  *) echo "usage: $0 minimal|data|vector|ml|gateway|full [docker compose up args]" >&2; exit 2 ;;
esac
# DAGMA_OBSERVABILITY=1 adds the observability profile to any group (docs/production.md).
[[ -z "${DAGMA_OBSERVABILITY:-}" ]] || profiles+=(observability)

files=(-f compose.yaml)
if [[ "$group" == gateway || "$group" == full ]]; then
  for cert in deploy/traefik/certs/dagma.crt deploy/traefik/certs/dagma.key; do
    [[ -f "$cert" ]] || { echo "No $cert: write the gateway's certificate with: dagma gateway cert" >&2; exit 2; }
  done
  files+=(-f deploy/traefik/compose.gateway.yaml)
fi

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
"${compose[@]}" "${files[@]}" "${args[@]}" up "$@"
if [[ "$group" == gateway || "$group" == full ]]; then
  port="${DAGMA_GATEWAY_PORT:-443}"
  echo "Through the gateway (a token with the ui scope in the dagma_token cookie; docs/production.md):"
  echo "  API https://api.dagma.localhost:$port  Dagster https://dagster.dagma.localhost:$port"
  echo "  MLflow https://mlflow.dagma.localhost:$port  app https://app.dagma.localhost:$port"
else
  echo "Dagster UI: http://127.0.0.1:${DAGMA_DAGSTER_PORT:-53000}  MLflow: http://127.0.0.1:${DAGMA_MLFLOW_PORT:-55000}"
fi
