"""The MLflow users of the stack's services, so that no service but MLflow holds the admin password.

Run after the server is up, as the admin (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD of the admin): by the one-shot `mlflow-users` service of
infra/docker-compose.yml at every start, and unchanged by tests/test_infra.py. For each role in
MLFLOW_SERVICE_USERS (default: WORKER), the user MLFLOW_<ROLE>_USER with the password
MLFLOW_<ROLE>_PASSWORD (created, or its password set again, so changing it in infra/.env and
restarting rotates it). Not an admin: it may create experiments and models (and manages those it
creates), and it is given what the pipeline works in, which is made here if it does not exist yet
(MLflow answers a non-admin "permission denied", not "no such model", for a model that does not
exist, so the pipeline could not tell "no champion yet" apart from "not allowed"):

- each experiment in MLFLOW_<ROLE>_EXPERIMENTS (worker default: grpo): EDIT;
- each registered model in MLFLOW_<ROLE>_MODELS (worker default: grpo-policy), and its base
  models' `<name>-reference`: EDIT; and MANAGE on `<name>.champion-lock`, the registered model
  whose existence is the lock on champion moves (pipelines/registry/promotion.py), so that the
  worker may read and break a stale lock another user left. That one is never created here.
"""

from __future__ import annotations

import os
import sys
import time

PLACEHOLDER = "CHANGE_ME"
MIN_PASSWORD = 12  # MLflow's basic auth refuses shorter passwords
DEFAULTS = {"WORKER": {"EXPERIMENTS": "grpo", "MODELS": "grpo-policy"}}


def service_users(env: dict[str, str]) -> list[tuple[str, str]]:
    """(user, password) for each role; refuses an empty, short or placeholder value with the variable's name."""
    users = []
    for role in _roles(env):
        name_key, password_key = f"MLFLOW_{role}_USER", f"MLFLOW_{role}_PASSWORD"
        for key in (name_key, password_key):
            value = env.get(key, "")
            if not value.strip() or PLACEHOLDER in value:
                raise SystemExit(f"mlflow-users: set {key} in infra/.env (empty or {PLACEHOLDER} is refused)")
        if len(env[password_key]) < MIN_PASSWORD:
            raise SystemExit(f"mlflow-users: {password_key} must be at least {MIN_PASSWORD} characters")
        users.append((env[name_key], env[password_key]))
    return users


def resources(env: dict[str, str], role: str) -> tuple[list[str], list[str]]:
    """(experiments, registered models) the role's user works in."""

    def names(kind: str) -> list[str]:
        raw = env.get(f"MLFLOW_{role}_{kind}", DEFAULTS.get(role, {}).get(kind, ""))
        return [n.strip() for n in raw.split(",") if n.strip()]

    return names("EXPERIMENTS"), names("MODELS")


def model_grants(model: str) -> dict[str, str]:
    """Registered model name -> permission for a pipeline model (names as pipelines/registry makes them)."""
    return {model: "EDIT", f"{model}-reference": "EDIT", f"{model}.champion-lock": "MANAGE"}


def _roles(env: dict[str, str]) -> list[str]:
    return [r.strip().upper() for r in env.get("MLFLOW_SERVICE_USERS", "WORKER").split(",") if r.strip()]


def main() -> int:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    env = dict(os.environ)
    users = service_users(env)
    uri = env["MLFLOW_TRACKING_URI"]
    auth, client = AuthServiceClient(uri), MlflowClient(tracking_uri=uri, registry_uri=uri)

    def retried(what: str, action, *args):
        for attempt in range(30):  # the server may still be starting its workers
            try:
                return action(*args)
            except MlflowException as exc:
                if attempt == 29 or exc.error_code in (
                    "PERMISSION_DENIED",
                    "UNAUTHENTICATED",
                    "INVALID_PARAMETER_VALUE",
                ):
                    raise SystemExit(f"mlflow-users: {what}: {exc}") from exc
                time.sleep(2)

    def ensure_user(name: str, password: str) -> None:
        try:
            auth.get_user(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            auth.create_user(name, password)
            print(f"mlflow-users: created {name}")
        else:
            auth.update_user_password(name, password)
            print(f"mlflow-users: {name} exists; password set from the environment")

    def grant(name: str, kind: str, resource: str, permission: str) -> None:
        try:
            auth.grant_user_permission(name, kind, resource, permission)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.revoke_user_permission(name, kind, resource)  # granted before: set this level again
            auth.grant_user_permission(name, kind, resource, permission)
        print(f"mlflow-users: {name} has {permission} on {kind} {resource}")

    def ensure_experiment(experiment: str) -> str:
        found = client.get_experiment_by_name(experiment)
        return found.experiment_id if found is not None else client.create_experiment(experiment)

    def ensure_model(model: str) -> None:
        try:
            client.get_registered_model(model)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(
                model, description="Registered by the GRPO pipeline (infra/mlflow/users.py)."
            )

    admin = env.get("MLFLOW_TRACKING_USERNAME")
    for role, (name, password) in zip(_roles(env), users, strict=True):
        if name == admin:
            raise SystemExit(f"mlflow-users: {name!r} is the admin; give the service a user of its own")
        retried(f"user {name}", ensure_user, name, password)
        experiments, models = resources(env, role)
        for experiment in experiments:
            experiment_id = retried(f"experiment {experiment}", ensure_experiment, experiment)
            retried(f"experiment {experiment}", grant, name, "experiment", experiment_id, "EDIT")
        for model in models:
            for registered, permission in model_grants(model).items():
                if permission != "MANAGE":  # the lock is never made here: its existence means "held"
                    retried(f"model {registered}", ensure_model, registered)
                retried(f"model {registered}", grant, name, "registered_model", registered, permission)
    return 0


if __name__ == "__main__":
    sys.exit(main())
