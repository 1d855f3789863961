"""params.yaml into typed config: presets, `-S` overrides, and errors that say what to fix."""

from __future__ import annotations

import os
import re
import stat
import time
import typing
from typing import Any

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt

from pipelines import config, params_file
from pipelines.config import ConfigError


def test_repo_params_load_and_default_is_embedded(project):
    cfg = config.load(project / "params.yaml")
    assert cfg.snapshot.source == "embedded"
    assert cfg.preset is None
    assert cfg.task == "math" and cfg.train.rewards is None  # null = the task's own rewards


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
    params_file.write_params(path, ["train.steps=3"], preset="smoke")
    text = path.read_text()
    assert "# Every knob of the pipeline" in text and "steps: 3" in text and "preset: smoke" in text
    assert config.load(path).train.steps == 3
    with pytest.raises(ConfigError):
        params_file.write_params(path, ["train.steps=lots"], preset=None)
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


# ---- Every numeric knob has bounds (issue "Hardening", item 2) ----

# Numeric fields that take any value, with the reason. A new int/float field without a bound fails
# test_every_numeric_field_has_bounds until it gets one (pydantic Field gt/ge/lt/le) or a line here.
ANY_VALUE = {
    "data.generator.a_min": "operand range: negative operands are problems too (a_min <= a_max is checked)",
    "data.generator.a_max": "operand range (a_min <= a_max is checked)",
    "data.generator.b_min": "operand range (b_min <= b_max is checked)",
    "data.generator.b_max": "operand range (b_min <= b_max is checked)",
    "train.rewards.weight": "a negative weight makes a reward a penalty",
}
# Numeric fields bounded by a validator rather than Field bounds: a value the validator must refuse.
BY_VALIDATOR = {"train.dynamic_sampling_oversample": 0.5}


def _numeric_fields(model: type, prefix: str = "") -> list[tuple[str, type, list[Any]]]:
    """(dotted key, int or float, bound constraints) for every numeric field, nested models included."""
    from pydantic import BaseModel

    found = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        kinds, models = set(), []
        for arg in _flat_args(info.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                models.append(arg)
            elif arg in (int, float):
                kinds.add(arg)
        for sub in models:
            found += _numeric_fields(sub, f"{key}.")
        if kinds:
            bounds = [m for m in info.metadata if isinstance(m, (Gt, Ge, Lt, Le))]
            found.append((key, float if float in kinds else int, bounds))
    return found


def _flat_args(annotation: Any) -> list[Any]:
    """The types inside `X | None`, `list[X]`, `Literal[...] | float`, ... (bool is not a number here)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return []
    if not args:
        return [] if annotation is bool else [annotation]
    return [leaf for arg in args for leaf in _flat_args(arg)]


def _violations(kind: type, bounds: list[Any]) -> list[Any]:
    """One value just outside each bound."""
    step = 1 if kind is int else 0.5
    values = []
    for b in bounds:
        if isinstance(b, Gt):
            values.append(b.gt)
        elif isinstance(b, Ge):
            values.append(b.ge - step)
        elif isinstance(b, Lt):
            values.append(b.lt)
        elif isinstance(b, Le):
            values.append(b.le + step)
    return [kind(v) if kind is int else v for v in values]


def _override(key: str, value: Any) -> str:
    """`-S` text setting `key` to `value`; a field of a list of sections goes into the default list's first item."""
    if key.startswith("train.rewards."):
        item = {**config.RewardSpec(name="accuracy").model_dump(), key.rsplit(".", 1)[1]: value}
        return f"train.rewards=[{yaml.safe_dump(item, default_flow_style=True).strip()}]"
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


NUMERIC = _numeric_fields(config.Config)


def test_the_walk_sees_every_section():
    keys = {key for key, _, _ in NUMERIC}
    assert {"train.steps", "train.lora.r", "train.rewards.weight", "data.generator.countdown.count"} <= keys
    assert {"snapshot.tiny.hidden_size", "evaluate.k", "registry.min_gain", "orchestration.watch_every_s"} <= keys
    assert len(keys) > 80


@pytest.mark.parametrize(("key", "kind", "bounds"), NUMERIC, ids=[key for key, _, _ in NUMERIC])
def test_every_numeric_field_has_bounds(key, kind, bounds):
    if key in ANY_VALUE or key in BY_VALIDATOR:
        assert not bounds or key in BY_VALIDATOR, f"{key} has bounds now: take it off the allow-list"
        bad = [BY_VALIDATOR[key]] if key in BY_VALIDATOR else []
    else:
        assert bounds, f"{key} ({kind.__name__}) has no bound: give it Field(ge=/gt=/le=/lt=) or list it in ANY_VALUE"
        bad = _violations(kind, bounds)
    if kind is float:
        bad += [float("inf"), float("nan")]  # never a setting
    for value in bad:
        with pytest.raises(ConfigError) as refused:
            config.resolve({}, [_override(key, value)])
        message = str(refused.value)
        assert key.replace("train.rewards.", "train.rewards.0.") in message, message
        assert "\n" not in message  # the CLI prints it as one line


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=-1",
        "train.steps=0",
        "train.prompts_per_step=0",
        "train.max_completion_length=0",
        "train.temperature=-1",
        "train.top_p=2",
        "train.learning_rate=-1",
        "train.lora.r=0",
        "train.beta=-1",
        "train.epsilon=-1",
        "train.max_grad_norm=-1",
        "train.time_budget_s=-5",
    ],
)
def test_the_reviewers_nonsense_is_refused_with_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^invalid configuration [^\n]*{re.escape(key)}: [^\n]*$"):
        config.resolve({}, [override])


def test_the_defaults_and_the_smoke_preset_are_within_bounds(project):
    config.resolve({})
    config.load(project / "params.yaml")
    config.load(project / "params.yaml", preset="smoke")


def test_an_empty_operand_range_is_refused():
    with pytest.raises(ConfigError, match="data.generator.*a_min \\(50\\) is above a_max"):
        config.resolve({}, ["data.generator.a_min=50"])


def test_grpo_run_with_a_bad_value_fails_at_once_and_leaves_params_alone(project, capsys):
    from flows.cli import main

    before = (project / "params.yaml").read_bytes()
    started = time.monotonic()
    code = main(["run", "-S", "train.steps=-1", "--project", str(project)])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 10
    assert err.count("\n") == 1 and err.startswith("grpo run: error: ") and "train.steps" in err, err
    assert (project / "params.yaml").read_bytes() == before


# ---- params.yaml written atomically, as written (item 3) ----


def test_write_params_without_overrides_leaves_the_file_byte_identical(project):
    path = project / "params.yaml"
    before = path.read_bytes()
    params_file.write_params(path, [], preset=None)
    assert path.read_bytes() == before
    assert "null" in before.decode() and '"0 2 * * *"' in before.decode()  # what the rewrite used to lose


@pytest.mark.parametrize(
    ("override", "old", "new"),
    [
        ("train.steps=3", "  steps: 30", "  steps: 3"),
        ("train.epsilon_high=0.28", "  epsilon_high: null     # clip", "  epsilon_high: 0.28     # clip"),
        ("orchestration.cron=null", '  cron: "0 2 * * *"         # the', "  cron: null                # the"),
        (
            "evaluate.bootstrap_samples=4000",
            "  bootstrap_samples: 2000  # paired",
            "  bootstrap_samples: 4000  # paired",
        ),
        ("data.generator.operators=[+]", '    operators: ["+", "*"]', "    operators: [+]"),
        (
            "orchestration.watch=[new.jsonl]",
            "  watch: []                 # files",
            "  watch: [new.jsonl]        # files",
        ),
    ],
)
def test_one_override_changes_exactly_one_line(project, override, old, new):
    path = project / "params.yaml"
    before = path.read_text().splitlines()
    params_file.write_params(path, [override], preset=None)
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith(old) and changed[0][1].startswith(new), changed
    key, _, value = override.partition("=")
    assert config.load(path).model_dump(mode="json") == config.resolve(config.read_params(path)).model_dump(mode="json")
    assert _dotted(config.load(path), key) == yaml.safe_load(value)


def _dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_replacing_a_list_or_adding_a_key_keeps_the_comments_around_it(project):
    path = project / "params.yaml"
    before = path.read_text()
    params_file.write_params(path, ["train.rewards=[{name: accuracy, weight: 2}]", "train.delta=1.5"], preset=None)
    after = path.read_text()
    # Every comment line survives, in order, and nothing else moved.
    comments = lambda text: [line for line in text.splitlines() if line.strip().startswith("#")]  # noqa: E731
    assert comments(after) == comments(before)
    assert "    - name: accuracy\n      weight: 2\n  # DAPO dynamic sampling" in after
    # The new key goes at the end of its section, before the blank line that ends it.
    assert "  decline_window: 3" in after and "\n  delta: 1.5\n\nevaluate:\n" in after
    cfg = config.load(path)
    assert cfg.train.delta == 1.5 and [(r.name, r.weight) for r in cfg.train.rewards] == [("accuracy", 2.0)]


def test_write_params_keeps_the_files_permissions(project):
    path = project / "params.yaml"
    path.chmod(0o640)
    params_file.write_params(path, ["train.steps=4"], preset=None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


class _Interrupted(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("where", ["while writing", "before the rename"])
def test_an_interrupted_write_leaves_the_old_file_whole(project, monkeypatch, where):
    path = project / "params.yaml"
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        """A file that writes half of what it is given, then is interrupted (Ctrl-C mid-write)."""

        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            raise _Interrupted

    if where == "while writing":
        monkeypatch.setattr(params_file.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(params_file.os, "replace", lambda *a: (_ for _ in ()).throw(_Interrupted()))
    with pytest.raises(_Interrupted):
        params_file.write_params(path, ["train.steps=3"], preset="smoke")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".params.yaml")) == []  # no temp left
    assert config.load(path).train.steps == 30


@pytest.mark.parametrize(
    "override",
    [
        "train.rewards=[&a {name: accuracy}, *a]",  # an alias
        "data.prompt.examples=&x []",  # an anchor alone
    ],
)
def test_yaml_anchors_and_aliases_are_refused(override):
    with pytest.raises(ConfigError, match="anchors and aliases"):
        config.resolve({}, [override])


def test_an_alias_bomb_in_params_yaml_is_refused_before_it_expands(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    path = tmp_path / "params.yaml"
    path.write_text(bomb)
    with pytest.raises(ConfigError, match="anchors and aliases"):
        config.load(path)
    from pipelines.params_file import write_params

    with pytest.raises(ConfigError, match="anchors and aliases"):
        write_params(path, ["train.steps=3"], None)
    assert path.read_text() == bomb  # nothing rewritten


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.temperature=1e-300", "train.temperature"),
        ("train.seed=1180591620717411303424", "train.seed"),
        ("train.num_generations=100000000", "train.num_generations"),
        ("evaluate.bootstrap_samples=1000000000000", "evaluate.bootstrap_samples"),
        ("train.rewards=[{name: accuracy, params: {blob: " + "x" * 20000 + "}}]", "characters"),
    ],
)
def test_extreme_values_are_refused_in_one_line(override, says):
    with pytest.raises(ConfigError, match=says) as refused:
        config.resolve({}, [override])
    assert "\n" not in str(refused.value)


def test_a_batch_no_machine_holds_is_refused():
    with pytest.raises(ConfigError, match="tokens a step"):
        config.resolve(
            {}, ["train.prompts_per_step=4096", "train.num_generations=4096", "train.max_completion_length=4096"]
        )


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.min_prompt_chars=50", "data.max_prompt_chars=10"],
        ["data.min_prompt_tokens=500", "data.max_prompt_tokens=10"],
        ["data.generator.countdown.min_number=30", "data.generator.countdown.max_number=5"],
    ],
)
def test_min_above_max_pairs_are_refused(overrides):
    with pytest.raises(ConfigError, match="is above"):
        config.resolve({}, overrides)


def test_more_processes_than_the_machine_has_is_refused():
    import os

    from pipelines.grpo.distributed import check

    train = config.resolve({}, ["train.prompts_per_step=4096"]).train
    with pytest.raises(ConfigError, match="more than this machine's"):
        check(train, (os.cpu_count() or 1) + 1)


def test_full_fine_tuning_on_the_vllm_backend_is_refused_before_any_server_starts():
    with pytest.raises(config.ConfigError, match="trains LoRA adapters only.*train.lora.enabled=true"):
        config.resolve({}, ["runtime.rollout_backend=vllm", "train.lora.enabled=false"])
    assert config.resolve({}, ["runtime.rollout_backend=vllm"]).train.lora.enabled
