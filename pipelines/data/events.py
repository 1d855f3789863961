"""New data is an event: `grpo.dataset.updated`, sent to the Prefect server after DVC has versioned it.

`grpo serve` deploys the retrain flow with a trigger on this event; the payload carries what the
flow needs (the dataset's path in the project and its sha256). This is the one module of pipelines/
that uses Prefect (`grpo data add` sends the event outside any flow): Prefect is imported inside the
functions that send and that read the server's address, so the domain code still imports and tests
without it (tests/test_layout.py holds it to that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASET_UPDATED = "grpo.dataset.updated"
RESOURCE_PREFIX = "grpo.dataset."
# The resource label that ties an event to one project: a `grpo serve` retrains only its own.
PROJECT_LABEL = "grpo.project"


@dataclass
class Sent:
    sent: bool
    message: str  # one line for the user: what was sent where, or why nothing was


def dataset_event(root: Path, path: str, digest: str, **extra: Any) -> dict[str, Any]:
    """The event's fields: the dataset (path relative to the project) as resource, path and digest as payload.

    >>> e = dataset_event(Path("/p"), "data/raw/new.jsonl", "ab12")
    >>> e["resource"]["prefect.resource.id"], e["payload"]["digest"]
    ('grpo.dataset.data/raw/new.jsonl', 'ab12')
    """
    return {
        "event": DATASET_UPDATED,
        "resource": {
            "prefect.resource.id": f"{RESOURCE_PREFIX}{path}",
            "prefect.resource.name": path,
            PROJECT_LABEL: str(root),
        },
        "payload": {"path": path, "digest": digest, "project": str(root), **extra},
    }


def api_url() -> str | None:
    """The Prefect server this process would talk to (PREFECT_API_URL or the active profile), if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


# How long a reachability probe waits for the Prefect server to answer at all.
REACH_TIMEOUT_S = 5.0


def unreachable(url: str, reason: str) -> str:
    """The one line a command prints when the Prefect server does not answer."""
    return (
        f"cannot reach the Prefect server at {url} ({reason}): start it (`prefect server start`) or fix PREFECT_API_URL"
    )


def prefect_problem(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """None when something answers HTTP at `url`/health within `timeout` seconds, else a short reason.

    Prefect's own client retries a connect timeout several times over its 60 s request timeout; this
    probe fails within `timeout`. Any HTTP answer counts (a workspace URL may not route /health) except
    a gateway's 502/503/504; certificates are not checked (nothing is sent, and the client checks them).
    """
    import re

    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout, verify=False)
    except httpx.TimeoutException:
        return f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        text = str(exc) or type(exc).__name__
        found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
        return found.group(0).strip() if found else text.splitlines()[0][:200]
    if response.status_code in (502, 503, 504):
        return f"HTTP {response.status_code} {response.reason_phrase}".strip()
    return None


def emit_dataset_updated(root: Path, path: str, digest: str, **extra: Any) -> Sent:
    """Send `grpo.dataset.updated` and wait until it is on the wire; never raises.

    Uses the events client directly rather than `emit_event`, whose background worker drops
    failures silently: a command that says "sent" must have sent.
    """
    url = api_url()
    if not url:
        return Sent(
            False, f"no Prefect server configured (PREFECT_API_URL): {DATASET_UPDATED} not sent, nothing retrains"
        )
    problem = prefect_problem(url)
    if problem is not None:  # say so in one line, before the events client prints its own warnings
        return Sent(
            False, f"{DATASET_UPDATED} not sent to {url} ({problem}); start the server, or retrain with `grpo run`"
        )
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(**dataset_event(root, path, digest, **extra))

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    try:
        asyncio.run(send())
    except Exception as exc:  # a server that is down must not fail the data command
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Sent(
            False, f"{DATASET_UPDATED} not sent to {url} ({reason}); start the server, or retrain with `grpo run`"
        )
    return Sent(True, f"sent {DATASET_UPDATED} for {path} (sha256 {digest[:12]}) to {url}")
