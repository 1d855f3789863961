#!/bin/sh
# Zero to a running stack in one command: `infra/up.sh` (from anywhere).
# The first time, writes infra/.env from .env.example with a fresh random value for every
# CHANGE_ME (readable only by you); later, adds any setting .env.example gained since (new secrets
# random too). Refuses to start while a secret is empty or still CHANGE_ME. Then builds and starts
# the stack and waits until it is healthy.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
env_file="$here/.env"
example="$here/.env.example"
umask 077

random_secret() {
  od -An -N18 -tx1 /dev/urandom | tr -d ' \n'
}

# A line of .env.example with each CHANGE_ME replaced by its own random value.
fill() {
  line=$1
  while case "$line" in *CHANGE_ME*) true ;; *) false ;; esac; do
    line=$(printf '%s' "$line" | sed "s/CHANGE_ME/$(random_secret)/")
  done
  printf '%s\n' "$line"
}

if [ ! -f "$env_file" ]; then
  while IFS= read -r line; do fill "$line"; done < "$example" > "$env_file"
  echo "wrote $env_file with new secrets (keep it; it is git-ignored)"
else
  while IFS= read -r line; do
    case "$line" in '' | '#'*) continue ;; esac
    key=${line%%=*}
    if ! grep -q "^$key=" "$env_file"; then
      fill "$line" >> "$env_file"
      echo "added $key to $env_file (a setting .env.example gained)"
    fi
  done < "$example"
fi

# Every setting .env.example marks CHANGE_ME is a secret: refuse it empty or unchanged.
bad=""
while IFS= read -r line; do
  case "$line" in '' | '#'*) continue ;; *CHANGE_ME*) ;; *) continue ;; esac
  key=${line%%=*}
  value=$(grep "^$key=" "$env_file" | tail -n 1 | cut -d= -f2-)
  value=${value#[\"\']}
  value=${value%[\"\']}
  case "$value" in '' | *CHANGE_ME* | *:) bad="$bad $key" ;; esac
done < "$example"
if [ -n "$bad" ]; then
  echo "infra/up.sh: refusing to start: these secrets in $env_file are empty or still CHANGE_ME:$bad" >&2
  echo "  give each a random value (e.g. the output of: od -An -N18 -tx1 /dev/urandom | tr -d ' \\n')," >&2
  echo "  or move $env_file away and run infra/up.sh again to have all of them written" >&2
  exit 1
fi

# The worker runs flow runs as the owner of this checkout (it writes data/, models/, ...).
WORKSPACE_UID=$(ls -nd "$here/.." | awk '{print $3}') WORKSPACE_GID=$(ls -nd "$here/.." | awk '{print $4}')
export WORKSPACE_UID WORKSPACE_GID
docker compose -p grpo --env-file "$env_file" -f "$here/docker-compose.yml" up -d --build --wait "$@"
echo "Prefect UI http://localhost:4200   MLflow http://localhost:5000   MinIO console http://localhost:9001"
echo "credentials: $env_file"
