"""Moving `champion`: by the gate at registration, by hand (`grpo promote`), back (`grpo rollback`).

Every move is one registry call (set_registered_model_alias), so the alias points at exactly one
version before and after it: a crash never leaves two champions or none. The history lives in
version tags: a version that takes `champion` first records the one it replaces as
`previous_champion`, which is where `grpo rollback` returns to (and rolling back again goes one
further, like popping a stack). Who moved it, when and why are tags too.

A move reads the champion, writes tags, then moves the alias; two writers doing that at once (two
workspaces, a person promoting while a retrain registers) could each record the same predecessor
and lose a move. MLflow has no compare-and-set, so every move runs under `champion_lock`, a lock
held in the registry itself (it works for every driver: CLI, DVC, Prefect, any machine), and is
read back afterwards: should the alias or its `previous_champion` not be what this writer left (a
writer that bypassed the lock, a lease that ran out), the move fails with `ChampionMoved`.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipelines.mlflow_store import CHAMPION, StoreError, alias_version, is_absent

PREVIOUS = "previous_champion"

# The lock on champion moves: how long a holder may keep it before others may break it (a move is a
# handful of registry calls; a crashed holder blocks others at most this long), and how long a
# writer waits for it before giving up with a message.
LOCK_LEASE_S = 120.0
LOCK_WAIT_S = 300.0
BREAKER_LEASE_S = 30.0  # breaking a stale lock takes two calls; a breaker older than this died
WAIT_SAY_S = 10.0  # a waiting writer says whom it waits for this often

log = logging.getLogger(__name__)


class PromotionError(StoreError):
    """A promotion, rollback or registry query that cannot be done; the message says what to do."""


class ChampionMoved(PromotionError):
    """After a move, the alias or its history is not what this writer left: another writer moved it."""


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


def lock_name(name: str) -> str:
    """The registered model whose existence is the lock on `name`'s champion moves."""
    return f"{name}.champion-lock"


@contextmanager
def champion_lock(
    client: Any, name: str, *, lease_s: float = LOCK_LEASE_S, wait_s: float = LOCK_WAIT_S, poll_s: float = 0.2
) -> Iterator[str]:
    """Hold the registry-wide lock on moving `name`'s `champion`; yields this holder's id.

    Creating a registered model is atomic where nothing else in the registry is (its name is a unique
    key of the store, SQLite or the server's database), so the lock is the registered model
    `<name>.champion-lock`: the writer whose create succeeds holds it, and its tags, written in the
    same call, say who holds it and until when (a lease). Others poll until it is deleted, or break
    it once the lease has run out (its holder died). Released by deleting it, only by its holder.
    """

    owner = f"{who()}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    lock = lock_name(name)
    started = time.monotonic()
    deadline, said = started + wait_s, started
    while True:
        expires = time.time() + lease_s
        if _create_lock(client, lock, owner, expires, f"Lock on moving {name}@{CHAMPION}; gone after the move."):
            holder = _lock_holder(client, lock)
            if holder is not None and holder[0] == owner:
                break  # read back: the lock is ours
            continue  # deleted and taken by another between the create and the read: not ours
        holder = _lock_holder(client, lock)
        if holder is not None and holder[1] < time.time():
            _break_lock(client, lock, holder[0])
            continue
        if holder is not None and time.monotonic() - said >= WAIT_SAY_S:
            said = time.monotonic()
            log.warning(
                "waiting %.0f s so far for %s, who holds the lock on %s@%s until %s (at most %.0f s more)",
                said - started, holder[0], name, CHAMPION, _stamp(holder[1]), max(0.0, deadline - said),
            )  # fmt: skip
        if time.monotonic() > deadline:
            who_, until = holder if holder is not None else ("?", 0.0)
            raise PromotionError(
                f"{name}@{CHAMPION} is being moved by {who_} (lock {lock!r}, lease until {_stamp(until)}); waited "
                f"{wait_s:g}s. Try again later; if that process is gone, the lease runs out by itself"
            )
        time.sleep(poll_s * random.uniform(0.5, 1.5))
    try:
        yield owner
        if time.time() > expires:
            # Too slow: another writer may have broken the lock meanwhile. The read-back already
            # passed, so the move itself stands; say so rather than trust the lease silently.
            raise ChampionMoved(
                f"the lock on {name}@{CHAMPION} ran out ({lease_s:.0f}s lease) before the move finished; "
                "check `grpo models` before moving it again"
            )
    finally:
        holder = _lock_holder(client, lock)
        if holder is not None and holder[0] == owner:
            _delete_lock(client, lock)


def _create_lock(client: Any, name: str, owner: str, expires: float, description: str) -> bool:
    """Create the registered model `name` as a lock held by `owner`; False when it exists already.
    Creation is atomic: the store's unique key on the name lets exactly one writer succeed."""
    import mlflow

    try:
        client.create_registered_model(
            name, tags={"owner": owner, "expires_at": f"{expires:.3f}", "expires": _stamp(expires)},
            description=f"{description} (pipelines/registry/promotion.py)",
        )  # fmt: skip
        return True
    except mlflow.exceptions.MlflowException as exc:
        # Taken (or released between the insert and the error's own look-up). SQLite under
        # concurrent writers can answer with the unique key's IntegrityError instead: taken too.
        code = getattr(exc, "error_code", None)
        if code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST") or "UNIQUE constraint" in str(exc):
            return False
        raise


def _lock_holder(client: Any, lock: str) -> tuple[str, float] | None:
    """(owner, lease end in epoch seconds) of the lock, or None when nobody holds it."""
    import mlflow

    try:
        tags = client.get_registered_model(lock).tags or {}
    except mlflow.exceptions.MlflowException as exc:
        if is_absent(exc):
            return None
        raise
    try:
        return tags.get("owner", "?"), float(tags.get("expires_at", "0"))
    except ValueError:
        return tags.get("owner", "?"), 0.0  # an unreadable lease counts as run out


def _break_lock(client: Any, lock: str, stale_owner: str) -> None:
    """Delete a lock whose lease ran out, if it is still that holder's.

    Under a second lock, the breaker: two writers that both saw the stale lease would otherwise both
    delete, and the second delete could remove the lock the first had just taken (both then hold it).
    With the breaker, the second re-reads the holder after the first is done and finds a live one."""
    breaker = f"{lock}.breaker"
    me = f"{who()}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not _create_lock(client, breaker, me, time.time() + BREAKER_LEASE_S, "Breaking a stale lock"):
        holder = _lock_holder(client, breaker)
        if holder is not None and holder[1] < time.time() - BREAKER_LEASE_S:
            _delete_lock(client, breaker)  # a breaker that died mid-break, long ago
        return  # someone else is breaking it: look again
    try:
        holder = _lock_holder(client, lock)
        if holder is not None and holder[0] == stale_owner and holder[1] < time.time():
            log.warning("breaking the lock of %s, whose lease ran out at %s", stale_owner, _stamp(holder[1]))
            _delete_lock(client, lock)
    finally:
        _delete_lock(client, breaker)


def _delete_lock(client: Any, lock: str) -> None:
    import mlflow

    try:
        client.delete_registered_model(lock)
    except mlflow.exceptions.MlflowException as exc:
        if not is_absent(exc):
            raise


def _stamp(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def move_champion(client: Any, name: str, version: str, previous: str | None, tags: dict[str, str]) -> None:
    """Tag `version` with its evidence and the champion it replaces, move the alias in one call, and
    check that both landed. Call it holding `champion_lock`, with `previous` read under that lock.

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
    verify_champion(client, name, version, previous)


def verify_champion(client: Any, name: str, version: str, previous: str | None, *, check_previous: bool = True) -> None:
    """Read the alias back: it must be `version`, and (for a promotion) record `previous` as its predecessor."""
    now = current_champion(client, name)
    found = str(now.version) if now is not None else None
    if found != str(version):
        raise ChampionMoved(
            f"{name}@{CHAMPION} should be v{version} after this move but is {'v' + found if found else 'unset'}: "
            "another writer moved it at the same time, outside the registry lock. Check `grpo models`, then set "
            "it with `grpo promote VERSION --reason TEXT`"
        )
    recorded = now.tags.get(PREVIOUS) or None
    if check_previous and recorded != (str(previous) if previous is not None else None):
        raise ChampionMoved(
            f"{name} v{version} took {CHAMPION} from {'v' + previous if previous else 'no champion'}, but its "
            f"{PREVIOUS} tag says {'v' + recorded if recorded else 'none'}: another writer moved it at the same "
            "time, so the rollback history is not what this move recorded. Check `grpo models` and fix the tag"
        )


def promote(client: Any, name: str, version: str, reason: str, user: str | None = None) -> dict[str, Any]:
    """Make `version` champion by hand, whatever the gate said; records who, when and why."""
    if not reason.strip():
        raise PromotionError("say why: grpo promote VERSION --reason 'TEXT'")
    target = get_version(client, name, version)
    user = user or who()
    with champion_lock(client, name):
        champion = current_champion(client, name)  # read under the lock: this is the predecessor recorded
        if champion is not None and str(champion.version) == str(target.version):
            raise PromotionError(f"{name} v{target.version} is already champion")
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
    user = user or who()
    with champion_lock(client, name):
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
        stamp = now()
        for key, value in {
            "rolled_back_by": user,
            "rolled_back_at": stamp,
            "rolled_back_reason": reason or "-",
        }.items():
            client.set_model_version_tag(name, champion.version, key, value)
        client.set_model_version_tag(name, previous, "restored_by", user)
        client.set_model_version_tag(name, previous, "restored_at", stamp)
        client.set_registered_model_alias(name, CHAMPION, previous)
        verify_champion(client, name, previous, None, check_previous=False)
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
                "preset": t.get("preset", "-"),  # a smoke run's figures say nothing about the real model
                "problems": _count(t.get("eval_problems")),
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


def _count(value: str | None) -> str:
    try:
        return str(round(float(value))) if value is not None else "-"
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
