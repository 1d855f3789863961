"""params.yaml into typed config: presets, `-S` overrides, and errors that say what to fix."""

from __future__ import annotations

import pytest

from pipelines import config
from pipelines.config import ConfigError


def test_repo_params_load_and_default_is_embedded(project):
    cfg = config.load(project / "params.yaml")
    assert cfg.snapshot.source == "embedded"
    assert cfg.preset is None
    assert [r.name for r in cfg.train.rewards] == ["accuracy", "format"]


def test_smoke_preset_and_overrides_win(project):
    cfg = config.load(project / "params.yaml", ["train.steps=7", "data.path=some.jsonl"], preset="smoke")
    assert cfg.snapshot.source == "tiny"
    assert cfg.train.steps == 7  # explicit override beats the preset
    assert cfg.train.num_generations == 4
    assert cfg.data.path == "some.jsonl"


def test_override_values_are_yaml():
    cfg = config.resolve({}, ["train.bf16=false", "train.epsilon_high=0.28", "data.generator.operators=[+]"])
    assert cfg.train.bf16 is False and cfg.train.epsilon_high == 0.28
    assert cfg.data.generator.operators == ["+"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=3"], "train.stepz"),
        (["train.steps=many"], "train.steps"),
        (["train.loss_type=ppo"], "train.loss_type"),
        (["novalue"], "KEY=VALUE"),
        (["train.steps.x=1"], "is a value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve({"train": {"steps": 1}}, overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="smoke"):
        config.resolve({}, preset="huge")


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="project folder"):
        config.load(tmp_path / "params.yaml")


def test_write_params_keeps_comments_and_refuses_bad_values(project):
    path = project / "params.yaml"
    config.write_params(path, ["train.steps=3"], preset="smoke")
    text = path.read_text()
    assert "# Every knob of the pipeline" in text and "steps: 3" in text and "preset: smoke" in text
    assert config.load(path).train.steps == 3
    with pytest.raises(ConfigError):
        config.write_params(path, ["train.steps=lots"], preset=None)
    assert config.load(path).train.steps == 3  # nothing half-written


def test_min_completion_length_above_max_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="min_completion_length.*raise train.max_completion_length"):
        config.resolve({"train": {"max_completion_length": 8}}, ["train.min_completion_length=9"])


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_cpu(monkeypatch, native):
    from pipelines import precision

    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    cfg = config.resolve({}, [])  # both defaults are `auto`
    assert cfg.train.bf16 is native and cfg.evaluate.bf16 is native
    cfg = config.resolve({"train": {"bf16": "auto"}, "evaluate": {"bf16": "AUTO"}}, [])
    assert cfg.train.bf16 is native and cfg.evaluate.bf16 is native
    assert config.resolve({}, ["train.bf16=false"]).train.bf16 is False


def test_bf16_true_without_bf16_instructions_warns_and_is_kept(monkeypatch):
    from pipelines import precision

    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"train.bf16: true on a CPU without bf16 instructions.*set train.bf16: auto"):
        cfg = config.resolve({}, ["train.bf16=true"])
    assert cfg.train.bf16 is True


def test_bf16_other_words_name_the_choices():
    with pytest.raises(ConfigError, match=r"evaluate.bf16.*true, false or auto"):
        config.resolve({}, ["evaluate.bf16=fast"])


def test_native_bf16_agrees_with_the_kernels_cpu_flags():
    from pathlib import Path

    from pipelines.precision import native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split())
    assert native_bf16() is bool(flags & {"avx512_bf16", "amx_bf16"})
