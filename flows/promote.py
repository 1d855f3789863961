"""The promotion flow: `champion` -> a chosen version by hand, optionally after a reviewer approves.

With `require_approval`, the run pauses (`pause_flow_run(wait_for_input=Approval)`) until someone
answers in the Prefect UI ("Resume" on the run) or with `resume_flow_run(id, run_input={...})`;
no answer within `orchestration.approval_timeout_s` fails the run and moves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from tasks.promotion import promote_version, refused


class Approval(RunInput):
    """The reviewer's answer: approve (default no) and an optional note kept with the reason."""

    approve: bool = False
    note: str = ""


@flow(name="grpo-promote", flow_run_name="promote-v{version}", log_prints=True)
def promote_model(
    version: str, reason: str, project: str = ".", require_approval: bool = False, requested_by: str | None = None
) -> dict[str, Any]:
    """Make `version` champion, after a reviewer's approval when `require_approval`."""
    from pipelines import config
    from pipelines.paths import Paths

    root = Path(project).resolve()
    if require_approval:
        timeout = config.load(Paths(root).params).orchestration.approval_timeout_s
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(description=f"Promote v{version} to champion? Reason: {reason}"),
            timeout=timeout,
            poll_interval=2,
        )
        if not answer.approve:
            return refused(version, reason, answer.note)
        reason = f"{reason} (approved{f': {answer.note}' if answer.note else ''})"
    return promote_version(root, version, reason, requested_by)
