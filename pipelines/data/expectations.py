"""The Great Expectations suite for a GRPO dataset, run on a file-backed GX context.

Four tables are validated: `rows` (one per dataset row: schema, types, nulls, unique ids, prompt
length, the verifier's reading of the answer), `leakage` (eval rows whose prompt is also in train),
and `train` / `eval` (minimum row counts after the split). The suites, their results and the data
docs all land under reports/, so users can open reports/data-docs/index.html and see exactly
which expectation a file broke. Each expectation carries a plain-words description, which is also
the reason written on a rejected row.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import DataConfig
from pipelines.data.checks import ANSWER_TYPES, ID_TYPES
from pipelines.io import staged_dir
from pipelines.verifiers.task import Task

SUITE = "grpo_dataset"
ROW_TABLES = ("rows", "leakage")  # tables whose failures are rows (and can be rejected one by one)


@dataclass
class Outcome:
    table: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int = 0
    rows: list[int] = field(default_factory=list)  # Table indices of the offending rows, all of them
    detail: str = ""
    description: str = ""

    def describe(self) -> str:
        where = f"({self.column})" if self.column else f" on the {self.table} split"
        return f"{self.expectation}{where}"

    @property
    def row_level(self) -> bool:
        return self.table in ROW_TABLES


def rows_suite(cfg: DataConfig, task: Task, length_unit: str = "chars") -> list[Any]:
    import great_expectations as gx

    e = gx.expectations
    if length_unit == "tokens":
        lo, hi = cfg.min_prompt_tokens, cfg.max_prompt_tokens
        length = e.ExpectColumnValuesToBeBetween(
            column="prompt_tokens",
            min_value=lo,
            max_value=hi,
            description=f"prompt outside {lo}..{hi} tokens (chat template applied; data.min/max_prompt_tokens)",
        )
    else:
        lo, hi = cfg.min_prompt_chars, cfg.max_prompt_chars
        length = e.ExpectColumnValuesToBeBetween(
            column="prompt_chars",
            min_value=lo,
            max_value=hi,
            description=f"prompt outside {lo}..{hi} characters (data.min/max_prompt_chars)",
        )
    suite = [
        e.ExpectColumnValuesToNotBeNull(column="id", description="missing or empty id"),
        e.ExpectColumnValuesToBeInSet(
            column="id_type", value_set=ID_TYPES, description="id is not a string or an integer"
        ),
        e.ExpectColumnValuesToBeUnique(column="id", description="id used by more than one row"),
        e.ExpectColumnValuesToNotBeNull(column="prompt_text", description="missing or empty prompt"),
        e.ExpectColumnValuesToBeInSet(
            column="prompt_kind",
            value_set=["text", "messages"],
            description="prompt is neither text nor a list of chat messages {role, content} with a user turn",
        ),
        length,
        e.ExpectColumnValuesToNotBeNull(column="answer", description="missing or empty answer"),
        e.ExpectColumnValuesToBeInSet(
            column="answer_type", value_set=ANSWER_TYPES, description="answer is not text or a number"
        ),
    ]
    suite.append(
        e.ExpectColumnValuesToBeNull(
            column="task_issue",
            description=f"not a {task.name} problem the task can check ({task.description or 'its check_row'})",
        )
    )
    return suite


def leakage_suite() -> list[Any]:
    import great_expectations as gx

    return [
        gx.expectations.ExpectColumnValuesToBeInSet(
            column="prompt_in_train",
            value_set=[False],
            description=(
                "held-out prompt also in an earlier split: a val prompt in train, or an eval prompt in train or val "
                "(same text once case, spacing and final punctuation are ignored)"
            ),
        )
    ]


def split_suite(name: str, minimum: int) -> list[Any]:
    import great_expectations as gx

    return [
        gx.expectations.ExpectTableRowCountToBeBetween(
            min_value=minimum, description=f"too few rows in the {name} split (data.min_{name}_rows)"
        )
    ]


class GxRun:
    """A file GX context under `gx_root`: validate tables one by one, then publish the data docs."""

    def __init__(self, gx_root: Path) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        gx_root.mkdir(parents=True, exist_ok=True)
        self.gx = gx
        self.root = gx_root
        self.context = gx.get_context(mode="file", project_root_dir=str(gx_root))
        # Progress bars on stderr would bury the one-paragraph refusal the CLI prints.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.context.data_sources.add_or_update_pandas("grpo")

    def validate(self, name: str, frame: pd.DataFrame, expectations: list[Any]) -> list[Outcome]:
        """Run `expectations` on `frame` (which has a `_row` column: Table indices)."""
        gx = self.gx
        asset = next((a for a in self.source.assets if a.name == name), None) or self.source.add_dataframe_asset(name)
        batch = next((b for b in asset.batch_definitions if b.name == "whole"), None)
        batch = batch or asset.add_batch_definition_whole_dataframe("whole")
        suite = self.context.suites.add_or_update(
            gx.ExpectationSuite(name=f"{SUITE}.{name}", expectations=expectations)
        )
        definition = self.context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"{SUITE}.{name}", data=batch, suite=suite)
        )
        frame = frame.reset_index(drop=True)
        result = definition.run(
            batch_parameters={"dataframe": frame},
            # COMPLETE: every offending row's index, so each one can be named or rejected.
            result_format={"result_format": "COMPLETE"},
        )
        row_ids = frame["_row"].to_numpy() if "_row" in frame else None
        outcomes = []
        for r in result.results:
            config = r.expectation_config
            indices = [i for i in (r.result.get("unexpected_index_list") or []) if isinstance(i, int)]
            rows = sorted({int(row_ids[i]) for i in indices}) if row_ids is not None else []
            outcomes.append(
                Outcome(
                    table=name,
                    expectation=config.type,
                    column=config.kwargs.get("column"),
                    success=bool(r.success),
                    unexpected_count=int(r.result.get("unexpected_count") or (0 if r.success else 1)),
                    rows=rows,
                    detail=_detail(config.kwargs, r.result),
                    description=config.description or "",
                )
            )
        return outcomes

    def publish(self, docs_dir: Path) -> None:
        """Build the data docs and swap them in for `docs_dir` (reports/data-docs) as one folder: a
        reader (or a crash) never meets half a site, and the old site stays until the new one is whole."""
        self.context.build_data_docs()
        site = self.root / "gx" / "uncommitted" / "data_docs" / "local_site"
        if site.exists():
            with staged_dir(docs_dir) as staging:
                shutil.copytree(site, staging, dirs_exist_ok=True)


def _detail(kwargs: dict[str, Any], result: dict[str, Any]) -> str:
    if "observed_value" not in result:
        return ""
    bounds = {k: kwargs[k] for k in ("min_value", "max_value") if kwargs.get(k) is not None}
    return f"observed {result['observed_value']}, expected {bounds}"
