#!/bin/sh
# One database and one login per service, created on the first start of an empty Postgres
# (the official image runs /docker-entrypoint-initdb.d/*.sh as POSTGRES_USER). The passwords come
# from the environment (infra/.env), never from this repository. tests/test_infra.py runs this
# same script against a throwaway cluster on loopback.
set -eu
: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD (infra/.env)}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (infra/.env)}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v prefect_password="$PREFECT_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
-- MLflow's basic-auth users and permissions live apart from its runs and registry.
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
