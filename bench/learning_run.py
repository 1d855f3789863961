"""Learning per minute of CPU: held-out strict accuracy against training wall time, ours vs TRL.

Both engines train a LoRA (r=16, all linear layers, G = 8) on the embedded SmolLM2-135M for the same
training-time budget on the same task and prompts; adapters are snapshotted along the way and every
snapshot is scored afterwards on the same held-out problems (greedy, strict `#### N`), so evaluation
time is not counted as training time.

    .venv/bin/python bench/learning_run.py --minutes 4 --engines ours trl -S data.generator.operators="['*']"

writes bench/results/<machine>/learning.json and the plot beside it (`--out` names another file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_vs_trl import QUIET  # noqa: E402
from bench.machine import describe, results_dir, slug  # noqa: E402

TASK = [  # multiplication, 1-digit x 2..19, one worked example, answer after ####
    "data.generator.operators=['*']",
    "data.generator.a_min=1",
    "data.generator.a_max=9",
    "data.generator.b_min=2",
    "data.generator.b_max=19",
    "data.generator.num_rows=1000",
    "data.eval_fraction=0.3",
    "data.max_eval_rows=64",
]
ENGINE = [
    "train.num_generations=8",
    "train.lora.r=16",
    "train.lora.alpha=32",
    "train.max_completion_length=48",
    "train.log_samples=0",
    "train.steps=10000",
    "train.keep_checkpoints=1000",
    "train.beta=0.0",  # as every recorded run before 2026-12-01 ran; `-S train.beta=0.04` for the demo's KL
    # as every recorded run ran unless it said (`--ours train.dynamic_sampling=true`); the demo has it on
    "train.dynamic_sampling=false",
]


def prepare(workdir: Path, overrides: list[str], chat_template: str | None = None) -> Path:
    """A project with validated data and the pinned reference; with `chat_template`, the reference's
    tokenizer carries that one of TRL's bundled templates instead of its own (both engines then read
    the same prompts, tools and tool replies)."""
    from pipelines import config
    from pipelines.data import validate
    from pipelines.paths import Paths
    from pipelines.snapshot import stage as snapshot_stage

    root = workdir / "project"
    root.mkdir(parents=True)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    source = [f"snapshot.source={with_template(workdir / 'source', chat_template)}"] if chat_template else []
    cfg = config.load(root / "params.yaml", [*TASK, *ENGINE, *overrides, *source])
    validate.run(cfg, Paths(root))
    snapshot_stage.run(cfg.snapshot, Paths(root))
    return root


def with_template(folder: Path, name: str) -> Path:
    """The embedded model saved to `folder` with TRL's bundled chat template `name` (e.g. qwen2_5).

    TRL's tool calling refuses a template without a tool format, SmolLM2's own among them; Qwen2.5's is
    ChatML like SmolLM2's (the same <|im_start|>/<|im_end|> tokens) and has one."""
    import trl

    from pipelines.config import SnapshotConfig
    from pipelines.snapshot.stage import load_source

    model, tokenizer = load_source(SnapshotConfig())
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_ours(root: Path, seconds: float, every: int, overrides: list[str], name: str = "ours") -> list[dict]:
    from pipelines import config
    from pipelines.grpo import trainer
    from pipelines.paths import Paths

    cfg = config.load(
        root / "params.yaml",
        [*TASK, *ENGINE, f"train.time_budget_s={seconds}", f"train.checkpoint_every={every}", *overrides],
    )
    paths = Paths(root / name)
    paths.root.mkdir()
    for name in ("data", "models"):
        os.symlink(root / name, paths.root / name)
    trainer.run(cfg, paths, log_to_mlflow=False)
    snaps = []
    wall = {}
    for folder in sorted(paths.checkpoints_dir.glob("step-*")):
        state = json.loads((folder / "state.json").read_text())
        wall = {int(h["step"]): h["wall_time"] for h in state["history"]}
        snaps.append(
            {
                "step": state["step"],
                "wall_time": state["history"][-1]["wall_time"],
                "weights": str(folder / "trainable.safetensors"),
            }
        )
    # Each snapshot's validation score as the trainer saw it, so that a seeds run can replay any
    # selection rule (`train.select_tolerance`) on the test scores afterwards.
    validated = {s["step"]: s for s in state.get("validation", {}).get("scores", [])} if snaps else {}
    for snap in snaps:
        if snap["step"] in validated:
            v = validated[snap["step"]]
            snap.update(val_accuracy=v["accuracy"], val_lenient_accuracy=v["lenient_accuracy"])
            snap["val_problems"] = v["problems"]
    best = paths.checkpoints_dir / "best"
    if (best / "best.json").exists():  # what train.select=best hands to `evaluate`: scored on the test split too
        step = json.loads((best / "best.json").read_text())["step"]
        snaps.append(
            {
                "step": step,
                "wall_time": wall.get(step, 0.0),
                "weights": str(best / "trainable.safetensors"),
                "selected": True,
            }
        )
    return snaps


def train_trl(root: Path, seconds: float, every: int, overrides: list[str], prompts: int = 1) -> list[dict]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipelines import config
    from pipelines.grpo.prompt_sampler import PromptSampler
    from pipelines.io import read_jsonl
    from pipelines.verifiers import catalog
    from pipelines.verifiers.math_task import TASK as MATH
    from pipelines.verifiers.rewards import accuracy_reward, format_reward

    cfg = config.load(root / "params.yaml", [*TASK, *ENGINE, *overrides])
    t = cfg.train
    # A task with tools (the calculator): TRL's own tool loop, as many turns as ours allows.
    task = catalog.load(cfg.task, root)
    tools = list(getattr(task, "tools", ()))
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    rows = PromptSampler(read_jsonl(root / "data/validated/train.jsonl"), t.seed).take(2000)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    ref = root / "models" / "reference"
    out = root / "trl"
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=t.num_generations * prompts,
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        max_steps=100000,
        learning_rate=t.learning_rate,
        beta=t.beta,
        loss_type=t.loss_type,
        bf16=t.bf16,
        use_cpu=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=t.seed,
        temperature=t.temperature,
        shuffle_dataset=False,
        # The math task's own weights when train.rewards is null (pipelines/verifiers/math_task.py).
        reward_weights=[r.weight for r in MATH.rewards] if t.rewards is None else [s.weight for s in t.rewards],
        max_tool_calling_iterations=task.max_turns - 1 if tools else None,
    )
    snaps: list[dict] = []
    clock = {"train": 0.0}

    class Budget(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, _args, state, control, model=None, **k):
            clock["train"] += time.perf_counter() - self.t
            if state.global_step % every == 0 or clock["train"] >= seconds:
                folder = out / f"snap-{state.global_step:06d}"
                model.save_pretrained(folder)
                snaps.append({"step": state.global_step, "wall_time": clock["train"], "adapter": str(folder)})
            if clock["train"] >= seconds:
                control.should_training_stop = True

    def last_turn(completions: list[Any]) -> list[Any]:
        # With tools a completion is the episode's messages; ours judges the last turn (the answer).
        return [c[-1:] if isinstance(c, list) else c for c in completions]

    def accuracy(prompts, completions, answer, **kw):
        return accuracy_reward(prompts, last_turn(completions), answer=answer)

    def fmt(prompts, completions, **kw):
        return format_reward(prompts, last_turn(completions))

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32),
        reward_funcs=[accuracy, fmt],
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(ref),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Budget()],
        tools=tools or None,
    )
    trainer.train()
    return snaps


def pick(snaps: list[dict], score_at: list[float] | None) -> list[dict]:
    """The snapshots to score: all of them, or the latest at or before each time in `score_at` (seconds),
    the last one and the selected one, which is all a table at fixed times needs.

    >>> s = [{"step": 5, "wall_time": 50}, {"step": 10, "wall_time": 100}, {"step": 15, "wall_time": 150}]
    >>> [p["step"] for p in pick(s, [60])]
    [5, 15]
    """
    if score_at is None:
        return snaps
    curve = [s for s in snaps if not s.get("selected")]
    keep = {id(curve[-1])} if curve else set()
    for t in score_at:
        before = [s for s in curve if s["wall_time"] <= t]
        if before:
            keep.add(id(before[-1]))
    return [s for s in snaps if id(s) in keep or s.get("selected")]


def independent_check(prompt: Any, text: str) -> bool | None:
    """A second verdict, computed without the pipeline's judge or the row's answer: for a prompt whose
    last question is `What is A * B?`, whether the completion ends in `#### ` and the product computed
    here (None for other prompts).

    >>> independent_check([{"role": "user", "content": "What is 12 * 34? Answer after ####."}], "= 408\\n#### 408")
    True
    >>> independent_check("What is 12 * 34?", "#### 407"), independent_check("Hi?", "1")
    (False, None)
    """
    import re

    if isinstance(prompt, list):  # chat messages: the question is the last user turn
        prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    asked = re.search(r"What is (\d+) \* (\d+)\?", str(prompt))
    if asked is None:
        return None
    said = re.search(r"####\s*(-?[\d,]+)\s*$", text)
    return said is not None and int(said.group(1).replace(",", "")) == int(asked.group(1)) * int(asked.group(2))


def scoring_setup(root: Path, overrides: list[str]) -> tuple[Any, int]:
    """The run's task (its judge, its tools) and its completion budget, as training had them."""
    from pipelines import config
    from pipelines.verifiers import catalog

    cfg = config.load(root / "params.yaml", [*TASK, *ENGINE, *overrides])
    return catalog.load(cfg.task, root), cfg.train.max_completion_length


def score_snapshots(
    root: Path,
    snaps: list[dict],
    bf16: bool = False,
    reference_cache: Path | None = None,
    task: Any = None,
    max_new_tokens: int = 48,
) -> list[dict]:
    """Greedy accuracy (strict and lenient) of the reference (wall time 0) and of every snapshot on the
    eval split, decoded as `evaluate` decodes (merged copy, bf16 when `bf16`).

    The reference's score depends only on the eval split, the dtype and the CPU (bf16 rounds differently
    on AMX and on AVX-512 BF16: 0.207 against 0.219 strict on the demo's 256 problems), so a seeds run
    scores it once and keeps it in `reference_cache`, keyed by all three. A selected snapshot whose
    weights equal a scored step's takes that step's score.

    Answers are judged by the run's `task` (the math task by default); a task with tools answers in
    episodes, as `evaluate` runs them. `check_accuracy` is the share `independent_check` finds right
    (multiplication questions only), a verdict computed without the judge."""
    import hashlib

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from pipelines.config import LoraConfig
    from pipelines.generation.multi_turn import Environment
    from pipelines.generation.rollout import generate
    from pipelines.generation.sampling_copy import SamplingCopy
    from pipelines.grpo.policy import add_lora
    from pipelines.io import read_jsonl
    from pipelines.snapshot.loading import load_reference
    from pipelines.verifiers.tools import native_format

    if task is None:
        from pipelines.verifiers.math_task import TASK as task

    eval_file = root / "data/validated/eval.jsonl"
    rows = read_jsonl(eval_file)
    dtype = torch.bfloat16 if bf16 else torch.float32
    key = f"{hashlib.sha256(eval_file.read_bytes()).hexdigest()}-{dtype}-{slug()}"
    if task.name != "math" or max_new_tokens != 48:  # (the keys of the runs before tasks had no such part)
        key += f"-{task.name}-{max_new_tokens}"

    def accuracy(model, tokenizer) -> dict[str, float]:
        model = SamplingCopy(model, dtype).model
        right = lenient = checked = 0
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            out = generate(
                model, tokenizer, [r["prompt"] for r in chunk], num_generations=1, max_new_tokens=max_new_tokens,
                do_sample=False, environment=Environment.of(task),
            )  # fmt: skip
            for text, row in zip(out.texts, chunk, strict=True):
                verdict = task.judge(text, row)
                right += verdict.correct
                lenient += verdict.lenient
                checked += bool(independent_check(row["prompt"], text))
        scores = {"accuracy": right / len(rows), "lenient_accuracy": lenient / len(rows), "problems": len(rows)}
        return scores | {"check_accuracy": checked / len(rows)}

    cache = json.loads(reference_cache.read_text()) if reference_cache and reference_cache.exists() else {}
    base, tokenizer = load_reference(root / "models/reference")
    if native_format(tokenizer):  # a template of TRL's (`--chat-template`), not the model's own
        key += f"-template-{hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:12]}"
    if key not in cache:
        cache[key] = {"step": 0, "wall_time": 0.0, **accuracy(base, tokenizer), "dtype": str(dtype)}
        if reference_cache:
            reference_cache.write_text(json.dumps(cache, indent=2))
    points = [cache[key]]
    weights: dict[int, dict] = {}
    for snap in snaps:
        fresh, _ = load_reference(root / "models/reference")
        if "adapter" in snap:
            model = PeftModel.from_pretrained(fresh, snap["adapter"])
        else:
            model = add_lora(fresh, LoraConfig(r=16, alpha=32))
            missing = model.load_state_dict(load_file(snap["weights"]), strict=False)
            assert not missing.unexpected_keys
        state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
        twin = weights.get(snap["step"])
        if snap.get("selected") and twin and all(torch.equal(v, twin["state"][k]) for k, v in state.items()):
            scores = {k: twin["point"][k] for k in ("accuracy", "lenient_accuracy", "problems", "check_accuracy")}
        else:
            scores = accuracy(model, tokenizer)
        point = {"step": snap["step"], "wall_time": snap["wall_time"], **scores}
        point.update({k: v for k, v in snap.items() if k.startswith("val_")})
        points.append({**point, "selected": True} if snap.get("selected") else point)
        if not snap.get("selected"):
            weights[snap["step"]] = {"state": state, "point": point}
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    return points


def child(args: argparse.Namespace) -> None:
    if args.child == "ours":
        snaps = train_ours(args.root, args.minutes * 60, args.every, args.set + args.ours)
    elif args.child == "ours-vllm":  # the same engine, rollouts on a vLLM CPU server (`make vllm`)
        vllm = ["runtime.rollout_backend=vllm", f"runtime.vllm.python={REPO / '.venv-vllm/bin/python'}"]
        snaps = train_ours(args.root, args.minutes * 60, args.every, args.set + args.ours + vllm, "ours-vllm")
    else:
        snaps = train_trl(args.root, args.minutes * 60, args.every, args.set, args.trl_prompts)
    score_at = [m * 60 for m in args.score_at] if args.score_at else None
    bf16 = {"float32": False, "bfloat16": True}.get(args.score_dtype)
    if bf16 is None:  # auto: as `evaluate` decodes (evaluate.bf16: auto)
        from pipelines.precision import native_bf16

        bf16 = native_bf16()
    task, budget = scoring_setup(args.root, args.set)
    print(json.dumps(score_snapshots(args.root, pick(snaps, score_at), bf16, args.reference_cache, task, budget)))


def plot(
    results: dict[str, list[dict]], out: Path, title: str, target: float | None, ceiling: float | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in results.items():
        # Steps, not lines: between snapshots an engine's model is its latest snapshot, which is
        # what "at equal wall time" compares (a straight line would draw accuracies never measured).
        points = [p for p in points if not p.get("selected")]
        ax.plot(
            [p["wall_time"] / 60 for p in points],
            [p["accuracy"] for p in points],
            marker="o",
            drawstyle="steps-post",
            label=name,
        )
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    if ceiling is not None:
        ax.axhline(
            ceiling,
            color="tab:red",
            linestyle=":",
            linewidth=1,
            label=f"reachable by sharpening {ceiling:.3f} (bench/archive/ceiling.py)",
        )
    ax.set_xlabel("training wall time (min, 2 CPU cores)")
    ax.set_ylabel("held-out strict accuracy (greedy)")
    ax.set_title(f"SmolLM2-135M, LoRA r=16, G=8: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def run_engines(args: argparse.Namespace, root: Path) -> dict[str, list[dict]]:
    """Each engine in its own process (a clean thread pool and clock), on the prepared project."""
    results = {}
    for engine in args.engines:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            engine,
            "--root",
            str(root),
            "--minutes",
            str(args.minutes),
            "--every",
            str(args.every),
        ]
        cmd += [a for s in args.set for a in ("-S", s)] + [a for s in args.ours for a in ("--ours", s)]
        cmd += ["--trl-prompts", str(args.trl_prompts), "--score-dtype", args.score_dtype]
        if args.score_at:
            cmd += ["--score-at", *map(str, args.score_at)]
        if args.reference_cache:
            cmd += ["--reference-cache", str(args.reference_cache)]
        proc = subprocess.run(cmd, env={**os.environ, **QUIET}, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{engine} failed")
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(engine, results[engine], flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--root", type=Path)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--every", type=int, default=5, help="snapshot every N steps")
    ap.add_argument("--engines", nargs="+", default=["ours", "trl"], help="ours, ours-vllm, trl")
    ap.add_argument("-S", "--set", action="append", default=[], help="override for both engines")
    ap.add_argument("--ours", action="append", default=[], help="override for this engine only (e.g. dynamic sampling)")
    ap.add_argument("--trl-prompts", type=int, default=1, help="prompts per TRL step (TRL's measured setting: 1 x G=8)")
    ap.add_argument(
        "--out",
        type=Path,
        default=results_dir() / "learning.json",
        help="default: bench/results/<machine>/; the plot beside it",
    )
    ap.add_argument("--title", default="multiplication 1-digit x 2..19", help="the task, for the plot's title")
    ap.add_argument("--target", type=float, default=0.85, help="a dashed target line on the plot; 0 = none")
    ap.add_argument(
        "--ceiling",
        type=float,
        help="a dotted line: the share of held-out problems bench/archive/ceiling.py found reachable",
    )
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from an existing --out file")
    ap.add_argument(
        "--score-at",
        type=float,
        nargs="+",
        help="score only the snapshots a table at these minutes reads (and the last and the selected); default all",
    )
    ap.add_argument(
        "--score-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="float32",
        help="decoding dtype when scoring; auto = as `evaluate` decodes (bf16 where the CPU has bf16 units)",
    )
    ap.add_argument("--reference-cache", type=Path, help="a JSON file that keeps the reference's score across runs")
    ap.add_argument(
        "--chat-template",
        help="one of TRL's bundled chat templates (e.g. qwen2_5) on the reference's tokenizer, for both engines: "
        "TRL's tool calling refuses SmolLM2's own",
    )
    args = ap.parse_args()
    os.environ.update(QUIET)
    if args.child:
        child(args)
        return
    if args.replot:
        plot(
            json.loads(args.out.read_text())["results"],
            args.out.with_suffix(".png"),
            args.title,
            args.target or None,
            args.ceiling,
        )
        return
    # every snapshot of a run (1-4 GB at one a step) is scratch once it is scored
    with tempfile.TemporaryDirectory(prefix="grpo-learn-", ignore_cleanup_errors=True) as workdir:
        results = run_engines(args, prepare(Path(workdir), args.set, args.chat_template))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": describe(),
                "minutes": args.minutes,
                "overrides": args.set,
                "ours_only": args.ours,
                "trl_prompts_per_step": args.trl_prompts,
                "chat_template": args.chat_template,
                "results": results,
            },
            indent=2,
        )
    )
    plot(results, args.out.with_suffix(".png"), args.title, args.target or None, args.ceiling)


if __name__ == "__main__":
    main()
