#!/bin/bash
# Runs once, on the first start of an empty volume: least-privilege roles that each own only
# their own database (the same layout `dagma services up` creates).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v dagster_pw="$DAGSTER_PG_PASSWORD" -v mlflow_pw="$MLFLOW_PG_PASSWORD" <<'SQL'
CREATE ROLE dagster LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'dagster_pw';
CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'mlflow_pw';
CREATE DATABASE dagster OWNER dagster;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE CONNECT, TEMPORARY ON DATABASE dagster, mlflow, mlflow_auth, postgres FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE dagster TO dagster;
GRANT CONNECT, TEMPORARY ON DATABASE mlflow, mlflow_auth TO mlflow;
SQL
