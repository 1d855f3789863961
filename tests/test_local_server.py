"""Issue 41: the temporary Prefect server of `grpo run` ends with its run (SIGTERM, SIGKILL), and the
embedded default keeps its Prefect state in the project (.grpo/prefect), not in ~/.prefect."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipelines.env import project_prefect_home
from tests.conftest import REPO, cli_env, make_project


def _env(**extra: str) -> dict[str, str]:
    env = cli_env()
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH"):
        env.pop(key, None)  # the embedded default: no server of the user's, no home of the test runner's
    return {**env, **extra}


def _server_of(proc: subprocess.Popen, timeout: float = 120) -> psutil.Process:
    """The uvicorn process `proc` started (Prefect's temporary server), once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode} before its server started:\n{proc.stderr.read()}"
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "uvicorn" in child.cmdline() and "--port" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise AssertionError("no temporary Prefect server started")


def _end(proc: subprocess.Popen, server: psutil.Process | None) -> None:
    """Whatever a failed test left running; then the pipes, which a server left behind would hold open."""
    for process in (psutil.Process(proc.pid) if proc.poll() is None else None, server):
        if process is not None and not _gone(process, timeout=0):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    proc.communicate(timeout=30)


def _gone(process: psutil.Process, timeout: float = 20) -> bool:
    """Whether `process` ended (a zombie counts) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _watchdogs(server: psutil.Process, timeout: float = 30) -> list[psutil.Process]:
    """The watchdog processes of `server`, once there is one (it starts when the server answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "flows.local_server" in (p.info["cmdline"] or []) and str(server.pid) in p.info["cmdline"]
        ]
        if found:
            return found
        time.sleep(0.2)
    return []


def test_a_sigterm_of_grpo_run_stops_its_server_and_the_runs_stay_in_the_project(tmp_path):
    root = make_project(tmp_path / "project")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--project", str(root)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = None
    try:
        server = _server_of(proc)
        watchdogs = _watchdogs(server)
        assert len(watchdogs) == 1
        os.kill(proc.pid, signal.SIGTERM)  # the run's process alone, as `kill PID` does
        assert proc.wait(60) == 128 + signal.SIGTERM
        assert _gone(server), "the temporary Prefect server outlived its run"
        assert _gone(watchdogs[0]), "the watchdog outlived the server it watched"
    finally:
        _end(proc, server)
    assert (root / ".grpo" / "prefect" / "prefect.db").exists()


def test_a_sigkilled_run_leaves_no_server_behind(tmp_path):
    start = "from flows.local_server import start_tied_to_this_process as s; print(s(), flush=True); input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", start],
        cwd=REPO,
        env=_env(PREFECT_HOME=str(tmp_path / "prefect")),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = None
    try:
        server = _server_of(proc)
        port = server.cmdline()[server.cmdline().index("--port") + 1]
        assert proc.stdout.readline().strip() == f"http://127.0.0.1:{port}/api"
        assert _watchdogs(server)
        proc.kill()  # no handler, no atexit: only the watchdog is left to stop the server
        proc.wait(10)
        assert _gone(server), "the temporary Prefect server outlived its SIGKILLed run"
    finally:
        _end(proc, server)


def test_prefect_home_is_the_projects_unless_the_user_chose(tmp_path, monkeypatch):
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
        monkeypatch.setenv(key, "")  # recorded, so that what the function sets is undone after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert project_prefect_home(tmp_path) == tmp_path / ".grpo" / "prefect"
    assert os.environ["PREFECT_HOME"] == str(tmp_path / ".grpo" / "prefect")
    assert Path(os.environ["PREFECT_HOME"]).is_dir()
    assert "PREFECT_PROFILES_PATH" not in os.environ  # no profiles of the user's to keep reading

    monkeypatch.setenv("PREFECT_HOME", "/somewhere/else")
    assert project_prefect_home(tmp_path / "other") is None and os.environ["PREFECT_HOME"] == "/somewhere/else"
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert project_prefect_home(tmp_path / "other") is None and "PREFECT_HOME" not in os.environ

    monkeypatch.delenv("PREFECT_API_URL")
    profiles = tmp_path / "home" / ".prefect" / "profiles.toml"
    profiles.parent.mkdir(parents=True)
    profiles.write_text('active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://10.0.0.1:4200/api"\n')
    project_prefect_home(tmp_path)
    assert os.environ["PREFECT_PROFILES_PATH"] == str(profiles)  # a server named there is still the one used
