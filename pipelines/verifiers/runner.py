"""Run verifier functions in a worker process, under a time limit that really stops them.

A verifier stuck in a regular expression holds the GIL, so a thread cannot be given up on in time,
and nothing can stop it short of ending the process it runs in. Here verifiers run in a worker
process that is killed (SIGKILL) when a function overruns its limit, and replaced at the next call.
A whole step's completions go in one message and every function's values come back in one reply
each, and the worker is kept between calls, so a step costs one round trip, not one process.

Start method, and why: on Linux the worker is forked. A forked worker sees every function the
parent can call, including ones registered at run time (tests monkeypatch `rewards.REWARDS` with
lambdas and local functions, which cannot be pickled to a spawned process), and it starts in
milliseconds. Forking a process that has other threads (torch's pool, MLflow, Prefect) is safe here
because the worker only runs pure-Python verifiers: it never touches torch, CUDA or a lock those
threads may hold, and a worker that hung anyway would be killed by the same time limit. Its
garbage collector is frozen so it does not copy the parent's memory by touching every object, and
it closes the files and sockets it inherited (as subprocess's close_fds does), so that it never
keeps a pipe, a connection or a lock file of the parent's open.
Elsewhere (macOS, Windows) the worker is spawned: functions that can be pickled by reference (every
built-in reward, the judge, any module-level function) run in it; one that cannot (a lambda, a
local function) runs in the caller under a thread with the same limit, which stops waiting for it
but cannot stop a pure-Python loop: define such functions at module level there.

The worker is started again when a call needs a function it was not started with (one registered
since). It stops by itself when its parent dies: at once when idle, and when busy through an alarm
set to each function's limit plus `BACKSTOP_S`, which the kernel delivers even to a process stuck
in C code (a parent killed with SIGKILL cannot kill it).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

STARTUP_LIMIT_S = 120.0  # a spawned worker imports the verifiers first; a forked one starts at once
_MAX_FUNCTIONS = 64  # functions a worker is started with; beyond, it is restarted with the call's own
BACKSTOP_S = 2.0  # a function still running this long after its limit ends its worker by itself


class VerifierError(RuntimeError):
    """A verifier failed, hung, or broke its contract; the message names it and the fix."""


def _start_method() -> str:
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: nothing is closed
        return []


def _serve(
    conn: Connection, other: Connection | None, functions: list[Callable[..., Any]], parent: int, inherited: list[int]
) -> None:
    """The worker's loop: run the named functions of each request in turn, one reply per function."""
    if other is not None:
        skip = {0, 1, 2, conn.fileno(), other.fileno()}
        other.close()  # the parent's end of the pipe: without this, EOF never comes
        for fd in inherited:  # the parent's files and sockets (multiprocessing's own pipes came later)
            if fd not in skip:
                try:
                    os.close(fd)
                except OSError:
                    pass
    gc.freeze()  # a forked worker must not copy the parent's heap by collecting it
    signal.set_wakeup_fd(-1)  # an event loop's wakeup socket of the parent's, closed above
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler of the parent's (Prefect, torchrun)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the backstop alarm ends the process, GIL or not
    conn.send(("ready",))
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:
                return  # the parent died without closing the pipe (kill -9): do not linger
            continue
        try:
            call_id, jobs, args, kwargs, timeout = conn.recv()
        except EOFError:
            return
        for index, (slot, params) in enumerate(jobs):
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout + BACKSTOP_S)
                try:
                    value = functions[slot](*args, **{**params, **kwargs})
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                conn.send(("ok", call_id, index, value))
            except BaseException as exc:  # reported to the parent with the function's name
                detail = "".join(traceback.format_exception(exc)[-8:])
                try:
                    conn.send(("error", call_id, index, type(exc).__name__, str(exc), detail))
                except Exception:  # an unpicklable value or message: say so rather than go silent
                    conn.send(("error", call_id, index, type(exc).__name__, repr(exc)[:2000], detail[-4000:]))
                break  # the parent stops at the first failure: do not run the rest


class Worker:
    """One worker process and the functions it was started with. Thread-safe: calls take turns."""

    def __init__(self, start_method: str | None = None) -> None:
        self.start_method = start_method or _start_method()
        self._process: Any = None
        self._conn: Connection | None = None
        self._functions: list[Callable[..., Any]] = []
        self._calls = 0
        self._lock = threading.Lock()

    def run(
        self,
        jobs: Sequence[tuple[str, Callable[..., Any], dict[str, Any]]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        timeout: float,
        what: str,
        knob: str,
    ) -> list[Any]:
        """`fn(*args, **{**params, **kwargs})` for each `(name, fn, params)` in `jobs`, in order,
        each under `timeout` seconds; the values in the same order.

        Raises VerifierError naming the function (`what` says what it is, e.g. "reward function")
        and the fix (`knob` is the config key of the limit) when one raises, overruns or kills
        the worker.
        """
        with self._lock:
            if self.start_method != "fork" and not all(_picklable(fn) for _, fn, _ in jobs):
                return [_run_in_thread(name, fn, args, {**params, **kwargs}, timeout, what, knob)
                        for name, fn, params in jobs]  # fmt: skip
            try:
                return self._run(jobs, args, kwargs, timeout, what, knob)
            except _Failed:
                raise  # the function raised; the worker is idle and fine
            except BaseException:
                # On a timeout or an interrupt the worker may still be busy: a stale reply must
                # never be read as the next call's, so it goes, and the next call starts another.
                self.close()
                raise

    def _run(self, jobs: Any, args: Any, kwargs: Any, timeout: float, what: str, knob: str) -> list[Any]:
        slots = [self._slot(fn) for _, fn, _ in jobs]
        if any(slot is None for slot in slots) or self._conn is None or not self._process.is_alive():
            self._restart([fn for _, fn, _ in jobs])
            slots = [self._slot(fn) for _, fn, _ in jobs]
        assert self._conn is not None
        self._calls += 1
        call_id = self._calls
        slots_params = [(slot, params) for slot, (_, _, params) in zip(slots, jobs, strict=True)]
        request = (call_id, slots_params, args, kwargs, timeout)
        try:
            self._conn.send(request)
        except Exception as exc:
            names = ", ".join(repr(name) for name, _, _ in jobs)
            raise VerifierError(
                f"could not send the completions to the verifier worker process for {what} {names}: "
                f"{type(exc).__name__}: {exc} (the columns a {what} gets must be picklable)"
            ) from exc
        values = []
        for name, _, _ in jobs:
            started = time.monotonic()
            while True:
                left = timeout - (time.monotonic() - started)
                if left <= 0 or not self._conn.poll(left):
                    raise VerifierError(
                        f"{what} {name!r} did not finish within {timeout:g} s and was stopped: fix the function "
                        f"(it may never finish on some completions) or raise {knob}"
                    )
                try:
                    reply = self._conn.recv()
                except (EOFError, OSError):
                    self._process.join(1)
                    code = self._process.exitcode
                    raise VerifierError(
                        f"{what} {name!r} ended the verifier worker process (exit code {code}); fix the function"
                    ) from None
                if reply[1] == call_id:
                    break  # an earlier call's reply cannot come (its worker was killed), but be sure
            if reply[0] == "error":
                _, _, _, kind, message, detail = reply
                error = _Failed(f"{what} {name!r} raised {kind}: {message}")
                error.function = name  # which of the call's functions raised
                error.add_note(f"in the verifier worker process:\n{detail}")
                raise error
            values.append(reply[3])
        return values

    def _slot(self, fn: Callable[..., Any]) -> int | None:
        return next((i for i, known in enumerate(self._functions) if known is fn), None)

    def _restart(self, needed: list[Callable[..., Any]]) -> None:
        self.close()
        known = self._functions if len(self._functions) + len(needed) <= _MAX_FUNCTIONS else []
        functions = known + [fn for fn in needed if not any(fn is k for k in known)]
        context = multiprocessing.get_context(self.start_method)
        ours, theirs = context.Pipe()
        forked = self.start_method == "fork"
        process = context.Process(
            target=_serve,
            args=(theirs, ours if forked else None, functions, os.getpid(), _open_fds() if forked else []),
            name="verifier-worker",
            daemon=True,  # ended with the parent's interpreter
        )
        process.start()
        theirs.close()
        if not ours.poll(STARTUP_LIMIT_S):
            process.kill()
            raise VerifierError(f"the verifier worker process did not start within {STARTUP_LIMIT_S:g} s")
        ours.recv()
        self._process, self._conn, self._functions = process, ours, functions

    def close(self) -> None:
        """Stop the worker (if any); the next call starts a new one."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join(5)


class _Failed(VerifierError):
    """A function raised in the worker; the worker itself is fine and is kept."""


FunctionRaised = _Failed  # public: the function raised (not a timeout or a crash), so its input can be bisected


def _picklable(fn: Callable[..., Any]) -> bool:
    try:
        pickle.dumps(fn)
    except Exception:
        return False
    return True


def _run_in_thread(
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float,
    what: str,
    knob: str,
) -> Any:
    """The fallback where the worker cannot receive `fn`: a thread that is given up on, not stopped."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread with the function's name
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"verifier-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise VerifierError(
            f"{what} {name!r} did not finish within {timeout:g} s: fix the function (it may never finish on "
            f"some completions) or raise {knob}; it still runs in a thread (define it at module level so that "
            "it runs in the worker process, where it can be stopped)"
        )
    if "error" in box:
        exc = box["error"]
        raise VerifierError(f"{what} {name!r} raised {type(exc).__name__}: {exc}") from exc
    return box["value"]


_SHARED: Worker | None = None
_SHARED_LOCK = threading.Lock()


def shared_worker() -> Worker:
    """The process's worker, started at its first call and kept: training and evaluation both use it."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Worker()
        return _SHARED


def run_limited(
    jobs: Sequence[tuple[str, Callable[..., Any], dict[str, Any]]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    timeout: float,
    what: str,
    knob: str,
) -> list[Any]:
    """`Worker.run` on the process's shared worker."""
    return shared_worker().run(jobs, args, kwargs, timeout=timeout, what=what, knob=knob)
