"""Moving `champion` from several writers at once (pipelines/registry/promotion.py).

Two processes (two workspaces, or a person promoting while a retrain registers) promote versions
of one registered model in the same SQLite store, many times. The registry-held lock serialises the
moves, so following `previous_champion` from the champion gives every move exactly once, in a
chain without cycles. A writer that bypasses the lock is caught by the read-back after the move.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.mlflow_store import CHAMPION
from pipelines.registry import promotion
from tests.conftest import REPO, cli_env

NAME = "grpo-policy"

WRITER = """
import json, random, sys, time
from pathlib import Path
from mlflow import MlflowClient
from pipelines.registry import promotion

uri, name, who, go = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
versions = sys.argv[5:]
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
rng = random.Random(who)
(go.parent / f"ready-{who}").touch()
while not go.exists():  # start together, so that the two writers' moves interleave
    time.sleep(0.01)
done = []
for version in versions:
    time.sleep(rng.uniform(0.05, 0.3))  # the rest of a run: evaluation, registration
    moved = promotion.promote(client, name, version, f"round by {who}", user=who)
    done.append([moved["champion"], moved["previous_champion"]])
print("MOVES", json.dumps(done))
"""


def _store(tmp_path: Path, versions: int):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(NAME)
    for i in range(versions):
        client.create_model_version(NAME, source=(tmp_path / f"v{i + 1}").as_uri())
    return uri, client


def _history(client) -> list[str]:
    """Versions from the champion back along `previous_champion`; fails on a cycle."""
    chain: list[str] = []
    version = client.get_model_version_by_alias(NAME, CHAMPION)
    while True:
        assert str(version.version) not in chain, f"cycle in the history: {chain} -> v{version.version}"
        chain.append(str(version.version))
        previous = version.tags.get(promotion.PREVIOUS)
        if not previous:
            return chain
        version = client.get_model_version(NAME, previous)


def test_two_writers_promoting_at_once_keep_one_consistent_history(tmp_path):
    rounds = 12
    uri, client = _store(tmp_path, 2 * rounds)
    go = tmp_path / "go"
    # Writer a promotes the odd versions, writer b the even ones, each in its own process.
    plan = {"a": [str(v) for v in range(1, 2 * rounds + 1, 2)], "b": [str(v) for v in range(2, 2 * rounds + 1, 2)]}
    procs = {
        who: subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, NAME, who, str(go), *versions],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who, versions in plan.items()
    }
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{who}").exists() for who in plan):  # both at the start line
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), "a writer did not start"
        time.sleep(0.05)
    go.touch()
    moves: dict[str, list[list[str | None]]] = {}
    for who, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        moves[who] = json.loads(out.split("MOVES", 1)[1])

    # Every move is recorded exactly once: the chain from the champion holds all 24 promoted versions,
    # no cycle, and ends at the first champion (nothing before it).
    chain = _history(client)
    assert sorted(chain, key=int) == [str(v) for v in range(1, 2 * rounds + 1)], chain
    # Each writer's own account agrees with the tags: the champion it replaced is the one it recorded.
    recorded = {c: p for who in moves for c, p in moves[who]}
    assert len(recorded) == 2 * rounds
    assert recorded == {v: p for v, p in zip(chain, [*chain[1:], None], strict=True)}
    # Each writer's moves are in its own order along the history (the chain runs newest first).
    for versions in plan.values():
        assert [v for v in reversed(chain) if v in versions] == versions
    # The writers did take turns (one after the other would prove little), and the lock is gone.
    turns = sum((a in plan["a"]) != (b in plan["a"]) for a, b in zip(chain, chain[1:], strict=False))
    assert turns >= 2, chain
    assert [m.name for m in client.search_registered_models()] == [NAME]


class _Interloper:
    """A client through which a second writer, bypassing the lock, moves the alias right after ours."""

    def __init__(self, client, alias_to: str | None = None, previous_to: str | None = None):
        self._client, self._alias_to, self._previous_to = client, alias_to, previous_to

    def __getattr__(self, attr):
        return getattr(self._client, attr)

    def set_registered_model_alias(self, name, alias, version):
        self._client.set_registered_model_alias(name, alias, version)
        if self._alias_to is not None:
            self._client.set_registered_model_alias(name, alias, self._alias_to)
        if self._previous_to is not None:
            self._client.set_model_version_tag(name, version, promotion.PREVIOUS, self._previous_to)


def test_a_move_that_does_not_land_as_written_is_an_error(tmp_path):
    _, client = _store(tmp_path, 4)
    promotion.promote(client, NAME, "1", "first")
    with pytest.raises(promotion.ChampionMoved, match="should be v2 after this move but is v3"):
        promotion.promote(_Interloper(client, alias_to="3"), NAME, "2", "raced")
    promotion.promote(client, NAME, "2", "again")  # the error released the lock
    with pytest.raises(promotion.ChampionMoved, match="previous_champion tag says v1"):
        promotion.promote(_Interloper(client, previous_to="1"), NAME, "4", "raced")
    with pytest.raises(promotion.ChampionMoved, match="should be v1 after this move but is v3"):
        promotion.rollback(_Interloper(client, alias_to="3"), NAME, "raced")


def test_a_held_lock_waits_and_a_dead_holders_lock_is_broken(tmp_path):
    _, client = _store(tmp_path, 2)
    lock = promotion.lock_name(NAME)
    # Someone holds the lock with a live lease: the writer waits, then says who holds it.
    client.create_registered_model(lock, tags={"owner": "carol@laptop:42:x", "expires_at": f"{time.time() + 60:.3f}"})
    with pytest.raises(promotion.PromotionError, match="being moved by carol@laptop:42:x"):
        with promotion.champion_lock(client, NAME, wait_s=0.5, poll_s=0.05):
            pass
    assert promotion.current_champion(client, NAME) is None
    # Its lease ran out (the holder died): the next writer breaks it and moves.
    client.set_registered_model_tag(lock, "expires_at", f"{time.time() - 1:.3f}")
    assert promotion.promote(client, NAME, "1", "after a crash")["champion"] == "1"
    assert [m.name for m in client.search_registered_models()] == [NAME]


def test_a_holder_that_outlives_its_lease_is_told(tmp_path):
    _, client = _store(tmp_path, 1)
    with pytest.raises(promotion.ChampionMoved, match="ran out"):
        with promotion.champion_lock(client, NAME, lease_s=0.05):
            time.sleep(0.1)
    assert [m.name for m in client.search_registered_models()] == [NAME]


def test_two_writers_after_a_stale_lease_never_both_hold_the_lock(tmp_path, monkeypatch):
    """Both see the dead holder's lease run out at the same moment; only one may take the lock."""
    import threading

    _, client = _store(tmp_path, 2)
    lock = promotion.lock_name(NAME)
    client.create_registered_model(lock, tags={"owner": "dead@host:1:x", "expires_at": f"{time.time() - 5:.3f}"})
    both_saw_it = threading.Barrier(2, timeout=10)
    real_holder = promotion._lock_holder
    seen: set[str] = set()

    def holder(c, name):
        found = real_holder(c, name)
        me = threading.current_thread().name
        if name == lock and found and found[0].startswith("dead@") and me not in seen:
            seen.add(me)
            both_saw_it.wait()  # neither breaks the lock before the other has seen it stale
        return found

    monkeypatch.setattr(promotion, "_lock_holder", holder)
    spans: dict[str, tuple[float, float]] = {}

    def writer(version: str) -> None:
        with promotion.champion_lock(client, NAME, wait_s=20, poll_s=0.02):
            start = time.monotonic()
            time.sleep(0.3)
            spans[threading.current_thread().name] = (start, time.monotonic())

    threads = [threading.Thread(target=writer, args=(v,), name=f"w{v}") for v in ("1", "2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (a0, a1), (b0, b1) = spans.values()
    assert a1 <= b0 or b1 <= a0, f"both held the lock at once: {spans}"
    assert [m.name for m in client.search_registered_models()] == [NAME]  # lock and breaker released


def test_a_waiting_writer_says_whom_it_waits_for(tmp_path, monkeypatch, caplog):
    import logging

    _, client = _store(tmp_path, 1)
    monkeypatch.setattr(promotion, "WAIT_SAY_S", 0.1)
    lock = promotion.lock_name(NAME)
    client.create_registered_model(lock, tags={"owner": "carol@laptop:42:x", "expires_at": f"{time.time() + 60:.3f}"})
    with caplog.at_level(logging.WARNING), pytest.raises(promotion.PromotionError):
        with promotion.champion_lock(client, NAME, wait_s=0.5, poll_s=0.05):
            pass
    assert "for carol@laptop:42:x, who holds the lock on grpo-policy@champion until" in caplog.text
