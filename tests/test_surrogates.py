"""A JSON `\ud800` escape (a lone surrogate) is a bad row named by its line, not a traceback."""

from __future__ import annotations

import pytest

from pipelines import config
from pipelines.data import validate
from pipelines.data.errors import DataError
from pipelines.paths import Paths


def test_a_lone_surrogate_escape_is_refused_by_line(project):
    rows = [f'{{"id": "q{i}", "prompt": "What is {i} + 1?", "answer": "{i + 1}"}}' for i in range(20)]
    rows[4] = '{"id": "q4", "prompt": "What is \\ud800 + 1?", "answer": "5"}'
    path = project / "surrogate.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = config.load(project / "params.yaml", [f"data.path={path}"], preset="smoke")
    with pytest.raises(DataError) as refused:
        validate.run(cfg, Paths(project))
    assert "line 5" in str(refused.value) and "lone surrogate" in str(refused.value)
    tolerant = config.load(
        project / "params.yaml", [f"data.path={path}", "data.max_rejected_fraction=0.2"], preset="smoke"
    )
    assert validate.run(tolerant, Paths(project)).rejected_rows == 1
