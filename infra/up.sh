#!/bin/sh
# Zero to a running stack in one command: `infra/up.sh` (from anywhere).
# The first time, writes infra/.env from .env.example with a fresh random value for every
# CHANGE_ME (readable only by you); then builds and starts the stack and waits until it is healthy.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
env_file="$here/.env"
if [ ! -f "$env_file" ]; then
  umask 077
  while IFS= read -r line; do
    while case "$line" in *CHANGE_ME*) true ;; *) false ;; esac; do
      secret=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
      line=$(printf '%s' "$line" | sed "s/CHANGE_ME/$secret/")
    done
    printf '%s\n' "$line"
  done < "$here/.env.example" > "$env_file"
  echo "wrote $env_file with new secrets (keep it; it is git-ignored)"
fi
# The worker runs flow runs as the owner of this checkout (it writes data/, models/, ...).
WORKSPACE_UID=$(ls -nd "$here/.." | awk '{print $3}') WORKSPACE_GID=$(ls -nd "$here/.." | awk '{print $4}')
export WORKSPACE_UID WORKSPACE_GID
docker compose -p grpo --env-file "$env_file" -f "$here/docker-compose.yml" up -d --build --wait "$@"
echo "Prefect UI http://localhost:4200   MLflow http://localhost:5000   MinIO console http://localhost:9001"
echo "credentials: $env_file"
