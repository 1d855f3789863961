"""Writes a crash cannot tear (pipelines/io.py): folder swaps, the validated splits, data docs, charts.

A crash is simulated by letting the first rename of a swap happen and making the next ones raise,
as a process killed between its two renames would leave things; the next run must then find the
old set whole (or finish with the new one), never a mix and never nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines import io
from pipelines.data import validate
from pipelines.io import recover_dir, replace_dir, replaced_file, staged_dir
from pipelines.paths import Paths


class Crash(OSError):
    """The process died here."""


def crash_after_first_rename(monkeypatch, into: Path) -> list[tuple[str, str]]:
    """From the first rename that touches `into` on, every rename in pipelines/io.py raises but that first one."""
    real = os.replace
    seen: list[tuple[str, str]] = []

    def replace(src, dst):
        if seen or Path(src) == into or Path(dst) == into:
            seen.append((str(src), str(dst)))
            if len(seen) > 1:
                raise Crash(f"killed before renaming {src} -> {dst}")
        return real(src, dst)

    monkeypatch.setattr(io, "os", SimpleNamespace(**{**vars(os), "replace": replace}))
    return seen


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _read(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------- the folder swap itself


def test_a_crash_between_the_two_renames_leaves_the_old_folder_to_recover(tmp_path, monkeypatch):
    target = _folder(tmp_path / "models" / "policy", {"a": "old a", "b": "old b"})
    staging = _folder(tmp_path / "models" / ".policy.staging.x", {"a": "new a", "b": "new b"})
    seen = crash_after_first_rename(monkeypatch, target)
    with pytest.raises(Crash):
        replace_dir(staging, target)
    assert seen[0] == (str(target), str(tmp_path / "models" / ".policy.old"))  # the one rename that happened
    assert not target.exists() and _read(tmp_path / "models" / ".policy.old") == {"a": "old a", "b": "old b"}
    monkeypatch.undo()

    # The next run: the old folder goes back into place instead of being deleted.
    recover_dir(target)
    assert _read(target) == {"a": "old a", "b": "old b"} and _leftovers(target.parent, "policy") == [
        ".policy.staging.x"
    ]
    # ...and the next swap then works as usual, leaving nothing behind.
    with staged_dir(target) as fresh:
        _folder(fresh, {"a": "newer"})
    assert _read(target) == {"a": "newer"} and _leftovers(target.parent, "policy") == [".policy.staging.x"]


def test_the_next_swap_recovers_first_and_a_finished_swap_drops_old(tmp_path, monkeypatch):
    target = _folder(tmp_path / "ref", {"w": "v1"})
    crash_after_first_rename(monkeypatch, target)
    with pytest.raises(Crash), staged_dir(target) as staging:
        _folder(staging, {"w": "v2"})
    monkeypatch.undo()
    assert not target.exists()
    # A later block that fails before its swap must not lose the recovered folder either.
    with pytest.raises(ValueError), staged_dir(target):
        raise ValueError("the stage failed")
    assert _read(target) == {"w": "v1"}

    # A crash after the second rename, in the clean-up: the new folder stands, `.old` is dropped.
    (tmp_path / ".ref.old").mkdir()
    (tmp_path / ".ref.old" / "w").write_text("v1")
    recover_dir(target)
    assert _read(target) == {"w": "v1"} and not (tmp_path / ".ref.old").exists()


# ---------------------------------------------------------------- data/validated: four files, one swap


def test_validated_splits_are_swapped_as_one_set_and_a_crash_keeps_the_old_set(project, smoke_cfg, monkeypatch):
    from pipelines import config

    paths = Paths(project)
    validate.run(smoke_cfg, paths)
    names = ("train.jsonl", "val.jsonl", "eval.jsonl", "rejected.jsonl")
    assert all((paths.validated_dir / n).exists() for n in names)
    (paths.validated_dir / ".gitignore").write_text("/train.jsonl\n/val.jsonl\n/eval.jsonl\n/rejected.jsonl\n")
    before = _read(paths.validated_dir)
    digest_before = json.loads(paths.validation_report.read_text())["digest"]

    other = config.load(project / "params.yaml", ["data.generator.seed=7"], preset="smoke")
    crash_after_first_rename(monkeypatch, paths.validated_dir)
    with pytest.raises(Crash):
        validate.run(other, paths)
    monkeypatch.undo()
    assert not paths.validated_dir.exists()  # killed between the renames: only `.validated.old` is left

    # The next run (here: its first step) puts the old set back, whole, .gitignore and all.
    recover_dir(paths.validated_dir)
    assert _read(paths.validated_dir) == before

    # A completed run swaps in the new set: every file new, DVC's .gitignore carried over, nothing left behind.
    result = validate.run(other, paths)
    after = _read(paths.validated_dir)
    assert result.digest != digest_before and set(after) == set(before)
    assert after[".gitignore"] == before[".gitignore"]
    assert all(after[n] != before[n] for n in ("train.jsonl", "eval.jsonl"))
    assert _leftovers(paths.validated_dir.parent, "validated") == []


def test_validate_recovers_an_interrupted_swap_by_itself(project, smoke_cfg, monkeypatch):
    """No explicit recovery: the next `grpo validate` restores the old set before its own swap."""
    paths = Paths(project)
    validate.run(smoke_cfg, paths)
    (paths.validated_dir / ".gitignore").write_text("/train.jsonl\n")
    crash_after_first_rename(monkeypatch, paths.validated_dir)
    with pytest.raises(Crash):
        validate.run(smoke_cfg, paths)
    monkeypatch.undo()
    validate.run(smoke_cfg, paths)
    assert (paths.validated_dir / ".gitignore").read_text() == "/train.jsonl\n"
    assert _leftovers(paths.validated_dir.parent, "validated") == []


# ---------------------------------------------------------------- data docs and charts


def test_data_docs_are_swapped_whole(project, smoke_cfg, monkeypatch):
    paths = Paths(project)
    validate.run(smoke_cfg, paths)
    docs = paths.data_docs
    (docs / "marker.txt").write_text("the site as it was")
    before = sorted(str(p.relative_to(docs)) for p in docs.rglob("*"))
    assert "index.html" in before

    crash_after_first_rename(monkeypatch, docs)
    with pytest.raises(Crash):
        validate.run(smoke_cfg, paths)
    monkeypatch.undo()
    recover_dir(docs)
    assert sorted(str(p.relative_to(docs)) for p in docs.rglob("*")) == before

    validate.run(smoke_cfg, paths)  # a whole new site: the old marker is gone with the old site
    assert (docs / "index.html").exists() and not (docs / "marker.txt").exists()
    assert _leftovers(docs.parent, "data-docs") == []


def test_a_chart_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from pipelines.evaluation import report
    from pipelines.grpo import plots

    out = tmp_path / "plots" / "train.png"
    history = [{"step": s, "wall_time": 10.0 * s, "reward": s / 4, "step_time": 1.0} for s in range(1, 5)]
    assert plots.training_curves(history, out) == out
    good = out.read_bytes()
    assert good.startswith(b"\x89PNG") and oct(out.stat().st_mode & 0o777) == "0o644"

    def dies_half_way(self, fname, **kwargs):
        Path(fname).write_bytes(good[:100])  # half a PNG, then the process is gone
        raise Crash("killed while saving")

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    with pytest.raises(Crash):
        plots.training_curves(history, out)
    evaluation = {"policy": {"accuracy": 0.5, "problems": 8}, "reference": {"accuracy": 0.25}}
    with pytest.raises(Crash):
        report.chart(evaluation, tmp_path / "reports" / "eval.png")
    monkeypatch.undo()
    assert out.read_bytes() == good  # the old chart, whole
    assert not (tmp_path / "reports" / "eval.png").exists()  # no chart rather than half of one
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["train.png"]  # no temp file left


def test_replaced_file_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "chart.png"
    path.write_bytes(b"old")
    path.chmod(0o640)
    with replaced_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp != path
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # nothing visible until the block ends
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o640
