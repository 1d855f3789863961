"""Presets never persist by surprise: `grpo run --preset` keeps the user's params.yaml, `grpo params
restore` (and `make demo`'s first step) puts it back byte for byte, and `-S preset=` is refused."""

from __future__ import annotations

import re

import pytest

from flows.cli import main
from pipelines import config, kept_params, params_file
from tests.conftest import REPO, make_project


def _apply(root, preset, overrides=()):
    """What the flow's apply-params task does (tasks/stages.py), without Prefect."""
    if preset is not None:
        kept_params.keep_before_preset(root)
    params_file.write_params(root / "params.yaml", list(overrides), preset)


def test_preset_then_restore_gives_back_the_users_params_byte_for_byte(tmp_path, capsys):
    root = make_project(tmp_path / "project")
    params = root / "params.yaml"
    # The user's own edit, with its comment and spelling, before the preset goes in.
    params.write_text(params.read_text().replace("  steps: 30", "  steps: 31    # mine"))
    mine = params.read_bytes()

    _apply(root, "smoke")
    assert config.load(params).preset == "smoke" and config.load(params).train.steps == 2
    _apply(root, "smoke", ["train.steps=3"])  # a second preset run keeps the first kept copy: still the user's
    assert (root / kept_params.KEPT).read_bytes() == mine

    assert main(["params", "restore", "--project", str(root)]) == 0
    assert params.read_bytes() == mine
    said = capsys.readouterr().out
    assert "params.yaml is yours again" in said and str(kept_params.REPLACED) in said
    assert "steps: 3" in (root / kept_params.REPLACED).read_text()  # the preset's file is not lost either
    assert not (root / kept_params.KEPT).exists()

    # Nothing left to restore: plain `restore` says so; `--if-preset` (make demo's step) does nothing.
    assert main(["params", "restore", "--project", str(root)]) == 1
    assert "it is your own; nothing restored" in capsys.readouterr().err
    assert main(["params", "restore", "--if-preset", "--project", str(root)]) == 0
    assert params.read_bytes() == mine


def test_demo_restores_the_users_params_before_it_runs(tmp_path):
    """`make demo` runs `grpo params restore --if-preset` before `grpo run`: always the demo's settings."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1).splitlines()
    restore = next(i for i, line in enumerate(recipe) if "grpo params restore --if-preset" in line)
    run = next(i for i, line in enumerate(recipe) if line.rstrip().endswith("grpo run"))
    assert restore < run

    root = make_project(tmp_path / "project")
    demo = (root / "params.yaml").read_bytes()
    _apply(root, "smoke")
    assert main(["params", "restore", "--if-preset", "--project", str(root)]) == 0
    assert (root / "params.yaml").read_bytes() == demo and config.load(root / "params.yaml").train.steps == 30


def test_a_preset_label_without_a_kept_copy_is_an_error_not_a_silent_smoke_run(tmp_path, capsys):
    root = make_project(tmp_path / "project")
    params_file.write_params(root / "params.yaml", [], "smoke")  # written by hand, nothing kept
    assert main(["params", "restore", "--if-preset", "--project", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'smoke' preset's values" in err and "git checkout params.yaml" in err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_setting_the_preset_label_with_S_is_refused(tmp_path, capsys, command):
    root = make_project(tmp_path / "project")
    before = (root / "params.yaml").read_bytes()
    assert main([command, "-S", "preset=smoke", "--project", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    said = "-S preset=smoke would only relabel the run, not apply the preset; use --preset smoke"
    assert err == f"grpo {command}: error: {said}"
    assert (root / "params.yaml").read_bytes() == before
    with pytest.raises(config.ConfigError, match="use --preset smoke"):
        params_file.write_params(root / "params.yaml", ["preset=smoke"], None)


def test_a_preset_label_over_other_values_is_refused_and_a_few_changes_on_top_pass(tmp_path):
    root = make_project(tmp_path / "project")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("preset: null", "preset: smoke"))  # what `dvc exp run -S` writes
    with pytest.raises(config.ConfigError, match=r"labelled `preset: smoke` but holds \d+ of that preset's") as err:
        config.load(params)
    assert "grpo run --preset smoke" in str(err.value) and "snapshot.source is 'embedded', not 'tiny'" in str(err.value)
    # The preset's values with two of them changed on top is still that preset.
    params.write_text(params.read_text().replace("preset: smoke", "preset: null"))
    params_file.write_params(params, ["train.steps=5", "train.learning_rate=0.001"], "smoke")
    cfg = config.load(params)
    assert cfg.preset == "smoke" and cfg.train.steps == 5


def test_dvc_exp_run_with_a_preset_label_is_refused_before_anything_trains(tmp_path):
    import subprocess
    import sys
    import time

    from tests.conftest import cli_env

    root = make_project(tmp_path / "project", dvc=True)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "preset=smoke"],
        cwd=root,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "labelled `preset: smoke`" in proc.stdout + proc.stderr
    assert "Running stage 'snapshot'" not in proc.stdout
    assert not any((root / "models").glob("*/*"))  # DVC makes the outs' folders; nothing was pinned or trained
    assert time.monotonic() - started < 60  # refused by the first stage's config check, not after training
