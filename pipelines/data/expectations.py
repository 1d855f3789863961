"""The Great Expectations suite for a GRPO dataset, run on a file-backed GX context.

The suite, its validation results and the data docs all land under reports/, so users can open
reports/data-docs/index.html and see exactly which expectation a file broke.
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

NUMERIC = r"^\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$"
SUITE = "grpo_dataset"


@dataclass
class Outcome:
    table: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int = 0
    lines: list[int] = field(default_factory=list)
    detail: str = ""

    def describe(self) -> str:
        where = f"({self.column})" if self.column else f" on the {self.table} split"
        return f"{self.expectation}{where}"


def rows_suite(cfg: DataConfig) -> list[Any]:
    import great_expectations as gx

    e = gx.expectations
    return [
        e.ExpectColumnValuesToNotBeNull(column="id"),
        e.ExpectColumnValuesToBeUnique(column="id"),
        e.ExpectColumnValuesToNotBeNull(column="prompt_text"),
        e.ExpectColumnValuesToBeInSet(column="prompt_kind", value_set=["text", "messages"]),
        e.ExpectColumnValueLengthsToBeBetween(
            column="prompt_text", min_value=cfg.min_prompt_chars, max_value=cfg.max_prompt_chars
        ),
        e.ExpectColumnValuesToNotBeNull(column="answer"),
        e.ExpectColumnValuesToMatchRegex(column="answer_final", regex=NUMERIC),
    ]


def split_suite(name: str, minimum: int) -> list[Any]:
    import great_expectations as gx

    return [gx.expectations.ExpectTableRowCountToBeBetween(min_value=minimum)]


def validate_frames(frames: dict[str, tuple[pd.DataFrame, list[Any]]], gx_root: Path, docs_dir: Path) -> list[Outcome]:
    """Run each frame's expectations in a file GX context under `gx_root`, build data docs into
    `docs_dir`, and return one outcome per expectation with the offending file lines."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    gx_root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(gx_root))
    source = context.data_sources.add_or_update_pandas("grpo")
    outcomes: list[Outcome] = []
    for name, (frame, expectations) in frames.items():
        asset = next((a for a in source.assets if a.name == name), None) or source.add_dataframe_asset(name)
        batch = next((b for b in asset.batch_definitions if b.name == "whole"), None)
        batch = batch or asset.add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=f"{SUITE}.{name}", expectations=expectations))
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"{SUITE}.{name}", data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame.reset_index(drop=True)},
            result_format={"result_format": "COMPLETE"},
        )
        for r in result.results:
            config = r.expectation_config
            indices = r.result.get("unexpected_index_list") or []
            lines = [int(frame["_line"].iloc[i]) for i in indices if isinstance(i, int)] if "_line" in frame else []
            outcomes.append(
                Outcome(
                    table=name,
                    expectation=config.type,
                    column=config.kwargs.get("column"),
                    success=bool(r.success),
                    unexpected_count=int(r.result.get("unexpected_count") or (0 if r.success else 1)),
                    lines=sorted(set(lines)),
                    detail=_detail(config.kwargs, r.result),
                )
            )
    context.build_data_docs()
    site = gx_root / "gx" / "uncommitted" / "data_docs" / "local_site"
    if site.exists():
        if docs_dir.exists():
            shutil.rmtree(docs_dir)
        shutil.copytree(site, docs_dir)
    return outcomes


def _detail(kwargs: dict[str, Any], result: dict[str, Any]) -> str:
    if "observed_value" not in result:
        return ""
    bounds = {k: kwargs[k] for k in ("min_value", "max_value") if kwargs.get(k) is not None}
    return f"observed {result['observed_value']}, expected {bounds}"
