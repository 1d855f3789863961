"""Registration, the promotion gate, rollback, `grpo models|promote|rollback|ask` on a SQLite registry.

The tiny random model scores 0 on the real verifiers, so a better or worse candidate is made by
writing the evaluation files from chosen per-problem outcomes (through the same writer `grpo
evaluate` uses); the registry, the gate and the alias moves are all real.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import config, mlflow_store
from pipelines.config import EvaluateConfig, RegisterConfig
from pipelines.evaluation import stage as evaluate
from pipelines.hashing import folder_sha256
from pipelines.io import read_jsonl, write_json
from pipelines.paths import Paths
from pipelines.registry import gate, promotion
from pipelines.registry import stage as registry
from tests.conftest import cli_env, download_version, make_project
from tests.test_evaluate import outcomes

NAME = "grpo-policy"

# What every version's tags must answer: which data, code, reference, params, scores.
LINEAGE_TAGS = {
    "data": ("dataset_digest", "dataset_source"),
    "code": ("git_commit", "git_dirty"),
    "reference": ("reference_sha256", "reference_model_uri"),
    "params": ("params_hash", "preset"),
    "scores": (
        "eval_accuracy",
        "eval_format_rate",
        "eval_reference_accuracy",
        "eval_gain_vs_reference_ci",
        "promotion_decision",
        "promotion_reason",
    ),
}
# ...and what its lineage JSON (the `lineage` tag) adds.
LINEAGE_RECORD = (
    "dvc_train_data_md5",
    "dvc_eval_data_md5",
    "dvc_policy_md5",
    "dvc_reference_md5",
    "eval_pass_at_k",
    "eval_mean_at_k",
    "eval_maj_at_k",
    "promotion_checks",
)


# ---------------------------------------------------------------- the gate, on per-problem outcomes


def _decide(candidate, champion, reference=None, fmt=1.0, **rules):
    reference = reference if reference is not None else [False] * len(candidate)
    evidence = gate.Evidence(candidate, reference, champion, fmt, "7" if champion is not None else None)
    return gate.decide(evidence, RegisterConfig(**rules), EvaluateConfig(bootstrap_samples=1000))


def test_gate_keeps_a_worse_candidate_and_says_why():
    d = _decide([True] * 10 + [False] * 10, [True] * 18 + [False] * 2)
    assert not d.promote and not d.checks["min_gain"] and not d.checks["ci_above_zero"]
    assert "champion v7" in d.reason and "gain -0.400" in d.reason and "failed min_gain" in d.reason


def test_gate_keeps_a_format_only_gain_when_skill_must_not_regress():
    """Strict accuracy up (format learned) while the last-number reading fell: challenger, and why."""
    strict = [True] * 12 + [False] * 8
    evidence = gate.Evidence(
        strict, [False] * 20, None, 1.0, None, candidate_lenient=[True] * 12 + [False] * 8,
        reference_lenient=[True] * 14 + [False] * 6,
    )  # fmt: skip
    rules = EvaluateConfig(bootstrap_samples=1000)
    kept = gate.decide(evidence, RegisterConfig(no_skill_regression=True), rules)
    assert not kept.promote and kept.checks["no_skill_regression"] is False
    assert "lenient accuracy 0.600 vs reference 0.700" in kept.reason
    assert "format only" in kept.reason and "2 of 20 problems" in kept.reason
    assert gate.decide(evidence, RegisterConfig(no_skill_regression=True), rules).reason == kept.reason  # seeded
    assert gate.decide(evidence, RegisterConfig(no_skill_regression=False), rules).promote


def test_gate_says_when_a_lenient_fall_is_within_the_noise():
    """Lost 3 problems and gained 2 of 20: the rule still fails (it is strict), but the reason says
    that the interval holds zero and how to tell the two apart, not that the gain is format only."""
    strict = [True] * 12 + [False] * 8
    reference_lenient = [True] * 10 + [False] * 2 + [True] * 3 + [False] * 5
    candidate_lenient = [True] * 12 + [False] * 3 + [False] * 5
    evidence = gate.Evidence(
        strict, [False] * 20, None, 1.0, None, candidate_lenient=candidate_lenient,
        reference_lenient=reference_lenient,
    )  # fmt: skip
    kept = gate.decide(evidence, RegisterConfig(no_skill_regression=True), EvaluateConfig(bootstrap_samples=1000))
    assert not kept.promote and kept.checks["no_skill_regression"] is False
    assert "0.600 vs reference 0.650" in kept.reason and "1 of 20 problems" in kept.reason
    assert "holds zero" in kept.reason and "data.max_eval_rows" in kept.reason and "grpo promote" in kept.reason
    assert "format only" not in kept.reason


def test_gate_promotes_a_clearly_better_candidate():
    d = _decide([True] * 18 + [False] * 2, [True] * 6 + [False] * 14)
    assert d.promote and all(d.checks.values())
    assert d.figures["gain_vs_champion"] == pytest.approx(0.6) and d.figures["gain_ci_low"] > 0


def test_gate_wants_the_interval_above_zero_unless_told_otherwise():
    slight = ([True] * 11 + [False] * 9, [True] * 10 + [False] * 10)  # one more problem right
    d = _decide(*slight)
    assert not d.promote and d.checks == {
        "min_format_rate": True,
        "no_regression_vs_reference": True,
        "min_gain": True,
        "ci_above_zero": False,
    }
    assert _decide(*slight, require_ci_above_zero=False).promote
    assert not _decide(*slight, require_ci_above_zero=False, min_gain=0.1).promote


def test_gate_format_rate_and_reference_regression():
    better = ([True] * 18 + [False] * 2, [False] * 20)
    assert not _decide(*better, fmt=0.5, min_format_rate=0.9).promote
    # No champion yet: the candidate must still not fall below the reference...
    d = _decide([True] * 5 + [False] * 15, None, reference=[True] * 10 + [False] * 10)
    assert not d.promote and d.checks["no_regression_vs_reference"] is False
    assert d.reason.startswith(f"{FIRST}: failed no_regression_vs_reference, min_gain, ci_above_zero")
    # ...and without that rule it is still below the reference, so still no gain to promote on.
    d = _decide([True] * 5 + [False] * 15, None, reference=[True] * 10 + [False] * 10, no_regression_vs_reference=False)
    assert not d.promote and d.reason.startswith(f"{FIRST}: failed min_gain, ci_above_zero")


FIRST = "no champion yet, so the candidate must beat the reference"


def test_a_first_version_no_better_than_its_reference_stays_challenger():
    """With no champion the reference is the bar, by the same rules: equal to it is no gain at all."""
    for same in ([False] * 20, [True] * 7 + [False] * 13):  # 0.000 vs 0.000 (the smoke runs), 0.350 vs 0.350
        d = _decide(same, None, reference=same)
        assert not d.promote and d.checks["min_gain"] is False and d.checks["ci_above_zero"] is False
        assert d.checks["no_regression_vs_reference"] is True  # not worse, which alone used to be enough
        rate = f"{sum(same) / 20:.3f}"
        assert d.reason.startswith(f"{FIRST}: failed min_gain, ci_above_zero; accuracy {rate} vs reference {rate}")
        assert "gain +0.000 (needs > 0 and >= 0.0)" in d.reason
    # A clear gain over the reference promotes the first version; a slight one needs its interval above zero.
    clear = _decide([True] * 15 + [False] * 5, None, reference=[True] * 5 + [False] * 15)
    assert clear.promote and clear.reason.startswith(f"{FIRST}: all gate rules hold")
    assert clear.figures["gain_vs_reference"] == pytest.approx(0.5) and clear.figures["gain_ci_low"] > 0
    slight = ([True] * 6 + [False] * 14, None, [True] * 5 + [False] * 15)
    assert not _decide(*slight).promote and _decide(*slight, require_ci_above_zero=False).promote
    assert not _decide(*slight, require_ci_above_zero=False, min_gain=0.1).promote
    # The absolute floor, with or without a champion.
    floor = _decide([True] * 15 + [False] * 5, None, reference=[True] * 5 + [False] * 15, min_accuracy=0.8)
    assert not floor.promote and floor.reason.startswith(f"{FIRST}: failed min_accuracy")
    assert "accuracy 0.750 < floor 0.8" in floor.reason
    assert not _decide([True] * 18 + [False] * 2, [True] * 6 + [False] * 14, min_accuracy=0.95).promote
    assert _decide([True] * 18 + [False] * 2, [True] * 6 + [False] * 14, min_accuracy=0.9).promote


def test_a_degraded_candidate_never_takes_champion():
    """Take the champion's outcomes and flip some right answers to wrong: never promoted."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 64)
        champion = [rng.random() < 0.6 for _ in range(n)]
        candidate = [c and rng.random() < 0.7 for c in champion]
        d = _decide(candidate, champion, require_ci_above_zero=rng.random() < 0.5, min_gain=rng.choice([0.0, 0.05]))
        assert not d.promote, (candidate, champion, d.reason)


# ---------------------------------------------------------------- a registrable project


def build_project(root: Path, tiny_reference: Path, export_check: bool = False) -> tuple[config.Config, Paths]:
    """Validated data, the tiny reference and a LoRA adapter with random (non-zero) weights.

    Non-zero LoRA B matrices change the model's answers, so a loader that drops the adapter shows.
    The export-parity check (a fresh process per registration) is off unless asked for: these tests
    register many times to test the gate and the aliases; tests/test_export_parity.py tests the check,
    and the end-to-end and stage tests register with it on.
    """
    import torch

    from pipelines.data import validate
    from pipelines.grpo.policy import add_lora
    from pipelines.snapshot.loading import load_reference

    make_project(root)
    cfg = config.load(root / "params.yaml", [f"registry.export_check={str(export_check).lower()}"], preset="smoke")
    paths = Paths(root)
    validate.run(cfg, paths)
    shutil.copytree(tiny_reference, paths.reference_dir)
    model, tokenizer = load_reference(paths.reference_dir)
    torch.manual_seed(0)
    peft_model = add_lora(model, cfg.train.lora)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.2)
    peft_model.save_pretrained(paths.policy_dir)
    tokenizer.save_pretrained(paths.policy_dir)
    write_json(paths.train_summary, {"steps": 0, "mlflow_run_id": None})
    return cfg, paths


def fake_evaluation(
    cfg: config.Config,
    paths: Paths,
    candidate: list[bool],
    champion: list[bool] | None,
    champion_version: str | None,
    reference: list[bool] | None = None,
) -> None:
    """reports/eval.json, metrics/eval.json and reports/eval-samples.jsonl as `grpo evaluate` writes them, from chosen
    outcomes."""
    manifest = json.loads((paths.reference_dir / "manifest.json").read_text())
    scored = {
        "reference": outcomes("reference", reference if reference is not None else [False] * len(candidate)),
        "policy": outcomes("policy", candidate),
    }
    if champion is not None:
        scored["champion"] = [dict(o, version=champion_version) for o in outcomes("champion", champion)]
    evaluate.write_outputs(
        paths,
        cfg.evaluate,
        scored,
        champion_version=champion_version,
        candidate_sha256=folder_sha256(paths.policy_dir),
        reference_sha256=manifest["sha256"],
    )


@pytest.fixture(autouse=True)
def _fresh_tracking_uri():
    """Each test finds its store from its project: mlflow.set_tracking_uri also exports
    MLFLOW_TRACKING_URI, which would otherwise leak one test's store into the next."""
    import mlflow

    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


BETTER = [True] * 7 + [False]
WORSE = [True] + [False] * 7


@pytest.fixture(scope="module")
def sqlite_project(tmp_path_factory, tiny_reference):
    cfg, paths = build_project(tmp_path_factory.mktemp("registry") / "project", tiny_reference)
    return cfg, paths


def _champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_register_gate_rollback_and_manual_promotion(sqlite_project, monkeypatch, capsys):
    from flows.cli import main

    cfg, paths = sqlite_project
    # v1: a real evaluation, no champion yet. The tiny random model scores as its reference does
    # (nothing right), so it does not beat it: challenger, and the reason says why.
    evaluate.run(cfg, paths)
    first = registry.run(cfg, paths)
    client = mlflow_store.registry_client(paths.root)
    assert not first.promoted and first.version == "1" and first.champion is None
    assert first.reason.startswith(f"{FIRST}: failed min_gain, ci_above_zero; accuracy 0.000 vs reference 0.000")
    assert promotion.current_champion(client, NAME) is None
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    assert client.get_model_version(NAME, "1").tags["promotion_decision"] == "kept"
    # A person makes it champion by hand (the gate does not block the manual path).
    monkeypatch.setenv("USER", "alice")
    assert main(["promote", "1", "--project", str(paths.root), "--reason", "baseline to compare against"]) == 0
    assert _champion(client) == "1" and "previous_champion" not in client.get_model_version(NAME, "1").tags
    capsys.readouterr()

    # A real evaluation again: the champion v1 is fetched from the registry and re-scored on the same problems.
    result = evaluate.run(cfg, paths)
    assert result.champion_version == "1" and result.comparison["policy_vs_champion"]["problems"] == 8
    assert "| metric | reference | champion v1 | candidate |" in paths.eval_report.read_text()
    assert {r["model"] for r in read_jsonl(paths.eval_samples)} == {"reference", "champion", "policy"}
    second = registry.run(cfg, paths)  # same adapter, same outcomes: no gain, kept
    assert not second.promoted and "failed min_gain" in second.reason and _champion(client) == "1"

    # A degraded candidate (worse than champion v1 on the same problems) never takes champion.
    fake_evaluation(cfg, paths, WORSE, BETTER, "1")
    third = registry.run(cfg, paths)
    assert not third.promoted and _champion(client) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"
    saved = json.loads(paths.registry_report.read_text())
    assert saved["promoted"] is False and saved["checks"]["min_gain"] is False and saved["champion"] == "1"

    # A clearly better one does, and records whom it replaced.
    fake_evaluation(cfg, paths, BETTER, WORSE, "1")
    fourth = registry.run(cfg, paths)
    assert fourth.promoted and _champion(client) == "4"
    v4 = client.get_model_version(NAME, "4").tags
    assert v4["previous_champion"] == "1" and v4["promotion_decision"] == "promoted" and v4["promoted_by"] == "gate"
    assert json.loads(paths.registry_report.read_text())["champion_before"] == "1"
    assert json.loads(paths.registry_metrics.read_text()) == {"version": "4", "decision": "promoted"}

    # Registering the same evaluation again makes no other version: it reports v4 as it was.
    assert registry.run(cfg, paths).version == "4" and len(client.search_model_versions(f"name='{NAME}'")) == 4

    # An evaluation that scored another champion than the current one cannot promote.
    fake_evaluation(cfg, paths, [True] * 8, WORSE, "1")
    fifth = registry.run(cfg, paths)
    assert (
        not fifth.promoted
        and "champion is v4 but reports/eval.json scored v1" in fifth.reason
        and _champion(client) == "4"
    )

    # Every version answers: which data, code, reference, params, scores.
    for version in client.search_model_versions(f"name='{NAME}'"):
        for what, keys in LINEAGE_TAGS.items():
            missing = [k for k in keys if not version.tags.get(k)]
            assert not missing, f"v{version.version} cannot say which {what}: {missing}"
        record = registry.recorded(version)
        assert not [k for k in LINEAGE_RECORD if not record.get(k)], f"v{version.version}'s lineage JSON"
    v1 = client.get_model_version(NAME, "1").tags
    assert v1["dataset_digest"] == json.loads(paths.validation_report.read_text())["digest"]
    # No dvc.lock in this project, and the record says so.
    assert registry.recorded(client.get_model_version(NAME, "1"))["dvc_train_data_md5"].startswith("unrecorded")
    assert v4["eval_champion_version"] == "1" and float(v4["eval_gain_vs_champion"]) == pytest.approx(0.75)

    # Rollback: champion back to v1, the demoted version says by whom.
    assert main(["rollback", "--project", str(paths.root), "--reason", "bad answers in prod"]) == 0
    assert _champion(client) == "1" and "v1 is champion again" in capsys.readouterr().out
    assert client.get_model_version(NAME, "4").tags["rolled_back_by"] == "alice"
    # v1 was the first champion: nothing further back.
    assert main(["rollback", "--project", str(paths.root)]) == 1
    assert "no previous champion" in capsys.readouterr().err and _champion(client) == "1"

    # Manual promotion records who and why; rollback undoes it.
    assert main(["promote", "2", "--project", str(paths.root), "--reason", "A/B test winner"]) == 0
    v2 = client.get_model_version(NAME, "2").tags
    assert _champion(client) == "2" and v2["promoted_by"] == "alice" and v2["promotion_reason"] == "A/B test winner"
    assert v2["previous_champion"] == "1"
    assert main(["promote", "2", "--project", str(paths.root), "--reason", "again"]) == 1  # already champion
    assert main(["promote", "99", "--project", str(paths.root), "--reason", "x"]) == 1
    assert "no version 99" in capsys.readouterr().err
    promotion.rollback(client, NAME, "undo", user="bob")
    assert _champion(client) == "1"

    assert main(["models", "--project", str(paths.root)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:6] == ["version", "aliases", "created", "preset", "problems", "accuracy"]
    assert listing[1].split()[0] == "5" and "challenger" in listing[1]
    problems = json.loads(paths.eval_results.read_text())["policy"]["problems"]
    assert listing[1].split()[4:6] == ["smoke", str(int(problems))]  # which preset, on how many test problems
    assert [line.split()[1] for line in listing if line.split()[0] == "1"] == ["champion"]


ASK_SCRIPT = """
import json, sys
sys.modules["pipelines"] = None  # prove the flavour needs nothing from this project
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/grpo-policy@champion")
print("ANSWER", json.dumps(model.predict(["What is 17 + 25?"])[0]))
"""


def test_ask_answers_as_plain_transformers_and_peft_do(sqlite_project, tmp_path, capsys):
    """`grpo ask` (pyfunc flavour), a fresh process without the project, and transformers + peft agree."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.cli import main
    from pipelines.data.prompts import build_messages

    cfg, paths = sqlite_project
    client = mlflow_store.registry_client(paths.root)
    if promotion.current_champion(client, NAME) is None:  # this test alone: register one, promote it by hand
        evaluate.run(cfg, paths)
        promotion.promote(client, NAME, registry.run(cfg, paths).version, "to ask it", user="test")

    # Plain transformers + peft from the downloaded artifacts: the recipe in docs/registry.md.
    base_dir, adapter_dir = download_version(NAME, "champion", tmp_path / "dl")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    from pipelines.data.prompts import task_prompt
    from pipelines.verifiers.math_task import TASK

    messages = build_messages("What is 17 + 25?", task_prompt(cfg.data.prompt, TASK))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=cfg.evaluate.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert expected  # the random adapter makes the tiny model say something

    assert main(["ask", "What is 17 + 25?", "--project", str(paths.root)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"{NAME} @champion = v") and printed.endswith(f": {expected}")

    uri = f"sqlite:///{paths.root / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", ASK_SCRIPT, uri],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("ANSWER", 1)[1]) == expected


def test_a_version_shows_its_signature_an_input_example_and_its_test_figures(sqlite_project, tmp_path):
    """MLflow's model page shows what to send: a test question (not the instruction around it) and the schema."""
    import mlflow

    cfg, paths = sqlite_project
    if not mlflow_store.store_exists(paths.root):  # this test alone
        evaluate.run(cfg, paths)
        registry.run(cfg, paths)
    client = mlflow_store.registry_client(paths.root)
    version = max(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    info = mlflow.models.get_model_info(f"models:/{NAME}/{version.version}")
    assert info.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert info.signature.outputs.to_dict() == [{"type": "string", "required": True}]
    assert [p.name for p in info.signature.params] == ["max_new_tokens"]
    assert info.saved_input_example_info["artifact_path"] == "input_example.json"
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}", dst_path=str(tmp_path)))
    example = json.loads((folder / "input_example.json").read_text())
    first = read_jsonl(paths.eval_split)[0]["prompt"][-1]["content"]  # "What is 9 + 11? Give the final answer ..."
    assert len(example) == 1 and example[0].startswith("What is ") and first.startswith(example[0])
    assert "####" not in example[0]  # the instruction is the model's to add

    # The run: a few held-out charts under test/ (the rest in a table), the registration in its description.
    run = client.get_run(version.run_id)
    assert "test/policy/accuracy" in run.data.metrics and "test/gain_vs_reference" in run.data.metrics
    assert not any(key.startswith("eval/") and key.count("/") > 1 for key in run.data.metrics)
    assert "test/policy/k" not in run.data.metrics and "test/policy/pass_at_k" not in run.data.metrics
    note = run.data.tags["mlflow.note.content"]
    assert note.count(registry.REGISTRATION_MARK) == 1 and f"`{NAME}` v{version.version}" in note


def test_git_dirty_leaves_out_what_the_pipeline_writes(tmp_path):
    """A demo run from a clean checkout is not dirty; a changed module is, and the tags say which and what it means."""
    from pipelines.source import git_state

    root = make_project(tmp_path / "project")
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "add", "-A")
    run("git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "project")
    paths = Paths(root)
    # What a pipeline run writes: params (a preset), dvc.lock, every stage's outputs, DVC's .gitignore files.
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "\n# preset: smoke\n")
    for path in (
        paths.train_metrics,
        paths.train_summary,
        paths.eval_metrics,
        paths.eval_results,
        paths.registry_metrics,
        paths.registry_report,
        paths.train_plot,
        paths.val_plot,
        paths.eval_report,
        paths.validation_report,
        root / "dvc.lock",
        root / "reports" / ".gitignore",
        paths.validated_dir / ".gitignore",
        root / ".grpo" / "state.yaml",
        root / "reports" / "run.json",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")  # fmt: skip
    state = git_state(root)
    assert state["git_dirty"] == "false", state.get("git_dirty_files")
    assert (
        state["git_commit"]
        == subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    )
    assert "params.yaml, dvc.lock" in state["git_dirty_means"]

    (root / "pipelines" / "grpo" / "loss.py").write_text("# changed\n")
    (root / "notes.txt").write_text("new file\n")
    state = git_state(root)
    assert state["git_dirty"] == "true"
    assert sorted(state["git_dirty_files"].split(", ")) == ["notes.txt", "pipelines/grpo/loss.py"]


def test_registry_commands_explain_a_missing_registry(tmp_path, capsys):
    from flows.cli import main

    root = make_project(tmp_path / "empty")
    assert main(["models", "--project", str(root)]) == 1
    assert "run `grpo register` first" in capsys.readouterr().err
    assert not (root / "mlflow.db").exists()


def test_register_refuses_an_adapter_that_was_not_evaluated(sqlite_project, tmp_path):
    cfg, original = sqlite_project
    paths = Paths(
        shutil.copytree(original.root, tmp_path / "project", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    )
    fake_evaluation(cfg, paths, BETTER, None, None)
    (paths.policy_dir / "adapter_config.json").write_text((paths.policy_dir / "adapter_config.json").read_text() + " ")
    with pytest.raises(registry.RegistryError, match="run `grpo evaluate` first"):
        registry.run(cfg, paths)
    assert not (paths.root / "mlflow.db").exists()  # refused before touching the registry


def test_a_champion_on_another_base_is_scored_on_its_own_base(sqlite_project, tmp_path, monkeypatch):
    """The champion was trained on a different reference (other sha256): evaluate fetches that base."""
    from pipelines.hashing import file_hash as sha256_file
    from pipelines.hashing import folder_digest

    cfg, original = sqlite_project
    ours = Paths(
        shutil.copytree(original.root, tmp_path / "ours", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    )
    theirs = Paths(shutil.copytree(ours.root, tmp_path / "theirs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ours.root / 'mlflow.db'}")  # one registry for both
    fake_evaluation(cfg, ours, BETTER, None, None)
    assert registry.run(cfg, ours).promoted

    # Another team's base: a changed file, so another sha256 (re-pinned in its manifest).
    ref = theirs.reference_dir
    (ref / "config.json").write_text((ref / "config.json").read_text() + "\n")
    manifest = json.loads((ref / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(ref / name) for name in manifest["files"]}
    manifest["sha256"] = folder_digest(manifest["files"])
    write_json(ref / "manifest.json", manifest)
    fake_evaluation(cfg, theirs, BETTER, WORSE, "1")
    assert registry.run(cfg, theirs).promoted  # v2, with its own -reference version

    result = evaluate.run(cfg, ours)
    evaluation = json.loads(ours.eval_results.read_text())
    assert result.champion_version == "2" and evaluation["champion_own_base"] is True
    assert "scored on its own base" in ours.eval_report.read_text()
