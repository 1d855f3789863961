"""Issue 4: `grpo data add` versions raw data with DVC and pushes it; the training run's MLflow
dataset input carries the validated data's digest."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from pipelines import config
from pipelines.data import validate
from pipelines.data.mlflow_input import DIGEST_CHARS, log_dataset_input
from pipelines.data.sources import DataError
from pipelines.hashing import content_digest
from pipelines.paths import Paths
from tests.conftest import make_project


def _problems(n: int, start: int = 0) -> str:
    return "".join(
        json.dumps({"id": f"q{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
        for i in range(start, start + n)
    )


def _add(root: Path, path: Path, capsys, *extra: str) -> tuple[int, dict | None, str]:
    code = main(["data", "add", str(path), "--project", str(root), *extra])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def _remote_has(root: Path, md5: str) -> bool:
    return (root / ".dvc-storage" / "files" / "md5" / md5[:2] / md5[2:]).exists()


def test_data_add_versions_a_file_pushes_it_and_prints_its_digest(tmp_path, capsys):
    root = make_project(tmp_path / "project", dvc=True)
    source = tmp_path / "incoming" / "mine.jsonl"
    source.parent.mkdir()
    source.write_text(_problems(20))

    code, added, _ = _add(root, source, capsys)
    assert code == 0
    assert added["digest"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert added == {
        "path": "data/raw/mine.jsonl",
        "digest": added["digest"],
        "dvc_file": "data/raw/mine.jsonl.dvc",
        "pushed": True,
    }
    assert (root / "data" / "raw" / "mine.jsonl").read_bytes() == source.read_bytes()
    first = yaml.safe_load((root / "data" / "raw" / "mine.jsonl.dvc").read_text())["outs"][0]["md5"]
    assert _remote_has(root, first)
    assert "/mine.jsonl" in (root / "data" / "raw" / ".gitignore").read_text()

    # A new version of the same file: a new digest, a new DVC hash, both versions in the remote.
    source.write_text(_problems(30))
    code, again, _ = _add(root, source, capsys)
    second = yaml.safe_load((root / "data" / "raw" / "mine.jsonl.dvc").read_text())["outs"][0]["md5"]
    assert code == 0 and again["digest"] != added["digest"] and second != first
    assert _remote_has(root, first) and _remote_has(root, second)

    # The versioned file is what validate reads.
    cfg = config.load(root / "params.yaml", ["data.path=data/raw/mine.jsonl"], preset="smoke")
    result = validate.run(cfg, Paths(root))
    assert result.train_rows + result.val_rows + result.eval_rows == 30
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "data/raw/mine.jsonl.dvc"], cwd=root, capture_output=True, text=True
    )
    assert status.returncode == 0 and "changed" not in status.stdout


def test_data_add_versions_a_folder(tmp_path, capsys):
    root = make_project(tmp_path / "project", dvc=True)
    folder = tmp_path / "batch"
    (folder / "part").mkdir(parents=True)
    (folder / "a.jsonl").write_text(_problems(10))
    (folder / "part" / "b.jsonl").write_text(_problems(10, start=10))
    code, added, _ = _add(root, folder, capsys)
    assert code == 0 and added["path"] == "data/raw/batch" and added["digest"] == content_digest(folder)
    out = yaml.safe_load((root / "data" / "raw" / "batch.dvc").read_text())["outs"][0]
    assert out["md5"].endswith(".dir") and out["nfiles"] == 2
    assert _remote_has(root, out["md5"])
    # Same content elsewhere, same digest; one byte changed, another digest.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "a.jsonl").write_text(_problems(10))
    (copy / "part").mkdir()
    (copy / "part" / "b.jsonl").write_text(_problems(10, start=10))
    assert content_digest(copy) == added["digest"]
    (copy / "a.jsonl").write_text(_problems(10) + "\n")
    assert content_digest(copy) != added["digest"]


def test_data_add_refusals_are_one_line_errors(tmp_path, capsys):
    plain = make_project(tmp_path / "plain")  # no git, no DVC
    data = tmp_path / "x.jsonl"
    data.write_text(_problems(3))
    code, _, err = _add(plain, data, capsys)
    assert code == 1 and err.startswith("grpo data: error:") and "not a DVC project" in err and "Fix" in err
    root = make_project(tmp_path / "project", dvc=True)
    code, _, err = _add(root, tmp_path / "missing.jsonl", capsys)
    assert code == 1 and "missing.jsonl: not found" in err and "Traceback" not in err
    (root / ".dvc" / "config").write_text("[core]\n    autostage = false\n")  # no remote configured
    code, _, err = _add(root, data, capsys)
    assert code == 1 and "`dvc push data/raw/x.jsonl.dvc` failed" in err and "--no-push" in err
    code, added, _ = _add(root, data, capsys, "--no-push")
    assert code == 0 and added["pushed"] is False and (root / "data" / "raw" / "x.jsonl.dvc").exists()


def test_log_dataset_input_puts_the_digest_on_the_training_run(project, smoke_cfg, tmp_path):
    import mlflow

    paths = Paths(project)
    result = validate.run(smoke_cfg, paths)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("lineage-test")
        with pytest.raises(RuntimeError, match="active MLflow run"):
            log_dataset_input(paths)
        with mlflow.start_run() as run:
            log_dataset_input(paths)
        logged = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
        # A later refused dataset rewrites the report but leaves the splits: the digest still names them.
        bad = project / "bad.jsonl"
        bad.write_text('{"id": "a"}\n')
        with pytest.raises(DataError):
            validate.run(config.load(paths.params, [f"data.path={bad}"], preset="smoke"), paths)
        with mlflow.start_run() as later:
            log_dataset_input(paths)
        stale = mlflow.get_run(later.info.run_id).inputs.dataset_inputs[0]
    finally:
        mlflow.set_tracking_uri(None)
    assert len(logged) == 1
    dataset, tags = logged[0].dataset, {t.key: t.value for t in logged[0].tags}
    assert dataset.digest == result.digest[:DIGEST_CHARS] and dataset.name == "validated:generator:math"
    assert tags["mlflow.data.context"] == "training" and tags["dataset_digest"] == result.digest
    assert (
        tags["train_rows"] == str(result.train_rows)
        and json.loads(dataset.schema)["mlflow_colspec"][1]["type"] == "array"
    )
    stale_tags = {t.key: t.value for t in stale.tags}
    assert stale.dataset.digest == dataset.digest and "another validation" in stale_tags["validation_report"]


# ---- Sources that must not be copied as they are (issue "Hardening", item 5) ----


def _fake_dvc_project(root: Path) -> Path:
    """A project that passes the `.dvc` check: enough for refusals, which come before DVC runs."""
    make_project(root)
    (root / ".dvc").mkdir()
    return root


def _raw_entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "data" / "raw").iterdir())


@pytest.mark.parametrize("source", ["data", ".", "data/raw", "data/validated", "data/validated/train.jsonl"])
def test_data_add_refuses_the_projects_own_data_folders(tmp_path, capsys, source):
    root = _fake_dvc_project(tmp_path / "project")
    (root / "data" / "raw" / "old.jsonl").write_text(_problems(3))
    (root / "data" / "validated").mkdir()
    (root / "data" / "validated" / "train.jsonl").write_text(_problems(3))
    code, _, err = _add(root, root / source, capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("grpo data: error:") and "Fix:" in err
    assert ("data/raw" in err) or ("data/validated" in err)
    assert _raw_entries(root) == [".gitkeep", "old.jsonl"]  # nothing copied, not even half a copy


def test_data_add_refuses_a_folder_deeper_in_data_raw(tmp_path, capsys):
    root = _fake_dvc_project(tmp_path / "project")
    (root / "data" / "raw" / "batch").mkdir()
    (root / "data" / "raw" / "batch" / "a.jsonl").write_text(_problems(3))
    code, _, err = _add(root, root / "data" / "raw" / "batch" / "a.jsonl", capsys)
    assert code == 1 and "already inside data/raw" in err and "Fix:" in err


def test_data_add_refuses_a_link_out_of_the_folder_and_names_it(tmp_path, capsys):
    root = _fake_dvc_project(tmp_path / "project")
    secret = tmp_path / "elsewhere" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text(_problems(2))
    folder = tmp_path / "batch"
    (folder / "part").mkdir(parents=True)
    (folder / "a.jsonl").write_text(_problems(3))
    (folder / "part" / "leak.jsonl").symlink_to(secret)
    code, _, err = _add(root, folder, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"{folder / 'part' / 'leak.jsonl'}: a symlink to {secret}, outside {folder}" in err and "Fix:" in err
    assert _raw_entries(root) == [".gitkeep"]
    # A link to a folder outside, a dangling link and a link that loops are refused the same way.
    (folder / "part" / "leak.jsonl").unlink()
    for name, target in [("out", secret.parent), ("gone.jsonl", tmp_path / "missing"), ("loop", folder)]:
        (folder / name).symlink_to(target)
        code, _, err = _add(root, folder, capsys)
        assert code == 1 and f"{folder / name}: a symlink to" in err and "Fix:" in err, err
        (folder / name).unlink()
    assert _raw_entries(root) == [".gitkeep"]


def test_data_add_keeps_the_name_the_user_gave_and_links_inside_the_folder(tmp_path, capsys):
    root = make_project(tmp_path / "project", dvc=True)
    real = tmp_path / "store" / "2024-06-01-export.jsonl"
    real.parent.mkdir()
    real.write_text(_problems(5))
    link = tmp_path / "file.jsonl"
    link.symlink_to(real)
    code, added, _ = _add(root, link, capsys, "--no-push")
    assert code == 0 and added["path"] == "data/raw/file.jsonl" and added["dvc_file"] == "data/raw/file.jsonl.dvc"
    stored = root / "data" / "raw" / "file.jsonl"
    assert not stored.is_symlink() and stored.read_bytes() == real.read_bytes()
    assert not (root / "data" / "raw" / real.name).exists()
    # Within a folder, a link to a file of the same folder is fine: stored as that file's content.
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_problems(3))
    (folder / "latest.jsonl").symlink_to("a.jsonl")
    code, added, _ = _add(root, folder, capsys, "--no-push")
    copied = root / "data" / "raw" / "batch" / "latest.jsonl"
    assert code == 0 and not copied.is_symlink() and copied.read_text() == _problems(3)


def test_a_file_swapped_for_a_link_after_the_check_is_never_versioned(tmp_path, capsys, monkeypatch):
    """The race: the folder passes the link check, then a racer swaps a file for a link to a secret."""
    from pipelines.data import versioning

    root = _fake_dvc_project(tmp_path / "project")
    secret = tmp_path / "elsewhere" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text('{"id": "s", "prompt": "password", "answer": "hunter2"}\n')
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_problems(3))
    (folder / "b.jsonl").write_text(_problems(2))
    checked = versioning._refuse_links_out

    def check_then_race(source, real):
        checked(source, real)
        (folder / "b.jsonl").unlink()
        (folder / "b.jsonl").symlink_to(secret)  # after the check, before the copy

    monkeypatch.setattr(versioning, "_refuse_links_out", check_then_race)
    code, _, err = _add(root, folder, capsys)
    assert code == 1 and "b.jsonl: a symlink to" in err and "nothing was versioned" in err, err
    assert _raw_entries(root) == [".gitkeep"]
    assert not any("hunter2" in p.read_text() for p in (root / "data").rglob("*.jsonl") if p.is_file())


def test_a_single_file_swapped_for_a_link_while_it_is_copied_is_refused(tmp_path, capsys, monkeypatch):
    from pipelines.data import versioning

    root = _fake_dvc_project(tmp_path / "project")
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"id": "s", "prompt": "password", "answer": "hunter2"}\n')
    data = tmp_path / "data.jsonl"
    data.write_text(_problems(3))
    checked = versioning._refuse_project_data

    def check_then_race(paths, source, real, target):
        checked(paths, source, real, target)
        data.unlink()
        data.symlink_to(secret)

    monkeypatch.setattr(versioning, "_refuse_project_data", check_then_race)
    code, _, err = _add(root, data, capsys)
    assert code == 1 and "became a symlink while it was being copied" in err, err
    assert _raw_entries(root) == [".gitkeep"]
