"""Moving `champion`: by the gate at registration, by hand (`grpo promote`), back (`grpo rollback`).

Every move is one registry call (set_registered_model_alias), so the alias points at exactly one
version before and after it: a crash never leaves two champions or none. The history lives in
version tags: a version that takes `champion` first records the one it replaces as
`previous_champion`, which is where `grpo rollback` returns to (and rolling back again goes one
further, like popping a stack). Who moved it, when and why are tags too.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
from typing import Any

from pipelines.mlflow_store import CHAMPION, StoreError, alias_version, is_absent

PREVIOUS = "previous_champion"


class PromotionError(StoreError):
    """A promotion, rollback or registry query that cannot be done; the message says what to do."""


def who() -> str:
    """The person (or service account) moving an alias: $USER, else the login name."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # getpass raises when no name can be found at all (some containers)
        return "unknown"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def current_champion(client: Any, name: str) -> Any | None:
    """The version holding `champion`, or None when there is none (or no such model yet)."""
    return alias_version(client, name, CHAMPION)


def get_version(client: Any, name: str, version: str) -> Any:
    import mlflow

    try:
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        if is_absent(exc):
            raise PromotionError(f"{name} has no version {version}; `grpo models` lists the versions") from exc
        raise


def move_champion(client: Any, name: str, version: str, previous: str | None, tags: dict[str, str]) -> None:
    """Tag `version` with its evidence and the champion it replaces, then move the alias in one call.

    The tags go first: should the process die in between, the old champion stays champion and the
    new version merely carries tags about a move that did not happen.
    """
    import mlflow

    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if previous is not None:
        client.set_model_version_tag(name, version, PREVIOUS, str(previous))
    else:
        try:  # a first champion has nothing to roll back to, whatever an old tag said
            client.delete_model_version_tag(name, version, PREVIOUS)
        except mlflow.exceptions.MlflowException:
            pass
    client.set_registered_model_alias(name, CHAMPION, version)


def promote(client: Any, name: str, version: str, reason: str, user: str | None = None) -> dict[str, Any]:
    """Make `version` champion by hand, whatever the gate said; records who, when and why."""
    if not reason.strip():
        raise PromotionError("say why: grpo promote VERSION --reason 'TEXT'")
    target = get_version(client, name, version)
    champion = current_champion(client, name)
    if champion is not None and str(champion.version) == str(target.version):
        raise PromotionError(f"{name} v{target.version} is already champion")
    user = user or who()
    previous = str(champion.version) if champion is not None else None
    move_champion(
        client,
        name,
        str(target.version),
        previous,
        {
            "promotion": f"promoted manually by {user}: {reason}",
            "promotion_decision": "promoted (manual)",
            "promotion_reason": reason,
            "promoted_by": user,
            "promoted_at": now(),
        },
    )
    return {"name": name, "champion": str(target.version), "previous_champion": previous, "by": user, "reason": reason}


def rollback(client: Any, name: str, reason: str = "", user: str | None = None) -> dict[str, Any]:
    """Move `champion` back to the version it replaced (the champion's `previous_champion` tag)."""
    champion = current_champion(client, name)
    if champion is None:
        raise PromotionError(f"{name} has no champion to roll back")
    previous = champion.tags.get(PREVIOUS)
    if not previous:
        raise PromotionError(
            f"{name} v{champion.version} has no previous champion recorded; choose one with "
            "`grpo promote VERSION --reason TEXT` (`grpo models` lists them)"
        )
    get_version(client, name, previous)  # refuse before touching anything if it was deleted
    user = user or who()
    stamp = now()
    for key, value in {"rolled_back_by": user, "rolled_back_at": stamp, "rolled_back_reason": reason or "-"}.items():
        client.set_model_version_tag(name, champion.version, key, value)
    client.set_model_version_tag(name, previous, "restored_by", user)
    client.set_model_version_tag(name, previous, "restored_at", stamp)
    client.set_registered_model_alias(name, CHAMPION, previous)
    return {"name": name, "champion": str(previous), "rolled_back": str(champion.version), "by": user, "reason": reason}


def list_versions(client: Any, name: str) -> list[dict[str, Any]]:
    """Every version of `name`, newest first, with its aliases and the figures from its tags."""
    import mlflow

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except mlflow.exceptions.MlflowException as exc:
        if is_absent(exc):
            raise PromotionError(f"no registered model {name!r} yet: run `grpo register` first") from exc
        raise
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True):
        t = v.tags
        created = dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
        rows.append(
            {
                "version": str(v.version),
                "aliases": ",".join(sorted(by_version.get(str(v.version), []))) or "-",
                "created": created,
                "accuracy": _rate(t.get("eval_accuracy")),
                "reference": _rate(t.get("eval_reference_accuracy")),
                "vs champion": _gain(t),
                "format": _rate(t.get("eval_format_rate")),
                "decision": t.get("promotion_decision", "-"),
                "git": t.get("git_commit", "?")[:8] + ("*" if t.get("git_dirty") == "true" else ""),
                "data": t.get("dataset_digest", "?")[:8],
            }
        )
    return rows


def _rate(value: str | None) -> str:
    try:
        return f"{float(value):.3f}" if value is not None else "-"
    except ValueError:
        return value or "-"


def _gain(tags: dict[str, str]) -> str:
    gain = tags.get("eval_gain_vs_champion")
    if gain is None:
        return "-"
    interval, versus = tags.get("eval_gain_vs_champion_ci", ""), tags.get("eval_champion_version", "?")
    return f"{float(gain):+.3f} {interval} (v{versus})".strip()


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned plain-text table.

    >>> print(table([{"version": "2", "aliases": "champion"}, {"version": "1", "aliases": "-"}]))
    version  aliases
    2        champion
    1        -
    """
    if not rows:
        return "(no versions)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)
