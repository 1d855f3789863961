"""The temporary Prefect server of `grpo run` (no PREFECT_API_URL set) ends with the run, however it ends.

Prefect starts that server (uvicorn, in a subprocess) on first use and stops it at exit, and two
endings skipped that exit: a SIGTERM (Prefect marks the run crashed, then re-sends the signal to the
default handler, which ends the process on the spot) and a SIGKILL. The server then outlived its run.
So `grpo run` starts the server itself, first: Prefect keeps one per port and reuses this one. A SIGTERM
ends the run as Ctrl-C does, through the exit handlers, and a watchdog process stops the server when the
run's process is gone, a SIGKILL included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

# How often the watchdog looks whether the run and its server are still there.
POLL_S = 0.5
# How long the server gets to stop after a SIGTERM before a SIGKILL.
GRACE_S = 5.0


def start_tied_to_this_process() -> str | None:
    """Start the temporary server now, unless a server is configured; its API URL, else None.

    Also from now on a SIGTERM raises SystemExit, so the exit handlers (Prefect's stop of the server
    among them) run; and a SIGINT raises KeyboardInterrupt even where a non-interactive shell started
    this process with SIGINT ignored.
    """
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None  # a server of the user's, or none at all: Prefect itself says what to set
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients get too (one per port)
    server.start()
    if server.server_process is not None:
        _start_watchdog(server.server_process.pid)
    return server.api_url


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # as a shell reports a process ended by this signal


def _start_watchdog(server_pid: int) -> subprocess.Popen[bytes]:
    """`python -m flows.local_server RUN_PID SERVER_PID`, in its own session: Ctrl-C or a kill of the
    run's process group does not reach it, so it is still there to stop the server."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.local_server", str(os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # the watchdog outlives the run: it must not hold the run's log open
        start_new_session=True,
    )


def watch(run_pid: int, server_pid: int) -> None:
    """Wait while both processes live; when the run is gone first, stop the server (SIGTERM, then SIGKILL)."""
    import psutil

    try:
        server = psutil.Process(server_pid)
    except psutil.NoSuchProcess:
        return
    try:
        run = psutil.Process(run_pid)
        while _alive(run) and _alive(server):
            time.sleep(POLL_S)
    except psutil.NoSuchProcess:
        pass  # the run ended before the watchdog looked: its server must go too
    if _alive(server):
        server.terminate()
        try:
            server.wait(GRACE_S)
        except psutil.TimeoutExpired:
            server.kill()


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie: a killed run stays a zombie until its parent reaps it."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
