#!/bin/sh
# Start `mlflow server` with its security settings: Postgres for runs and the registry, artifacts
# proxied to S3/MinIO (clients never hold storage credentials), only the Host names in
# MLFLOW_ALLOWED_HOSTS, and HTTP basic auth (`--app-name basic-auth`).
#
# The basic-auth config file holds a database URI with a password, so it is written here, from the
# environment, into a private file; the admin password reaches MLflow as MLFLOW_AUTH_ADMIN_PASSWORD.
# Used by infra/docker-compose.yml and, unchanged, by tests/test_infra.py on loopback.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql+psycopg2://mlflow:PASSWORD@postgres:5432/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI, e.g. postgresql+psycopg2://mlflow:PASSWORD@postgres:5432/mlflow_auth}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow-artifacts/}"
: "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS: the Host names clients use, e.g. mlflow,mlflow:5000,localhost:5000}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
# The basic-auth app signs its CSRF tokens with this; every server replica needs the same one.
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)}"
# .env.example's placeholder is not a secret.
for value in "$MLFLOW_AUTH_ADMIN_PASSWORD" "$MLFLOW_FLASK_SERVER_SECRET_KEY" "$MLFLOW_BACKEND_STORE_URI" "$MLFLOW_AUTH_DATABASE_URI"; do
  case "$value" in *CHANGE_ME*) echo "mlflow-entrypoint: a secret is still CHANGE_ME (infra/.env); refusing to start" >&2; exit 1 ;; esac
done

config="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
mkdir -p "$(dirname "$config")"
umask 077
# configparser reads '%' as interpolation: double it in the URI.
auth_uri=$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')
cat > "$config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${auth_uri}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"

exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
  --app-name basic-auth \
  "$@"
