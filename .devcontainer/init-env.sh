#!/usr/bin/env sh
# initializeCommand, on the host before compose starts: compose.yaml refuses to start without
# its passwords, so give a fresh checkout a private .env. A value already in the environment
# (a Codespaces secret) wins; an existing .env line is kept.
set -eu
cd "$(dirname "$0")/.."
touch .env
chmod 600 .env
for name in POSTGRES_PASSWORD DAGSTER_PG_PASSWORD MLFLOW_PG_PASSWORD QDRANT_API_KEY \
    MINIO_ROOT_PASSWORD CLICKHOUSE_PASSWORD; do
  grep -q "^${name}=" .env && continue
  value=$(printenv "$name" || true)
  [ -n "$value" ] || value=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s=%s\n' "$name" "$value" >> .env
done
