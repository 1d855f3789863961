"""Learning over seeds, side by side: accuracy at fixed training times as mean ± sd, the area under
the curve, and the selected model against the last step, for each engine, in one command.

Each (engine, seed) is one bench/learning_run.py run on the same data and held-out problems (the
seed is the training seed; the split stays fixed so that runs are paired), run one after another
on the same machine. Accuracy at time t is the engine's latest snapshot at or before t (what a
user stopping at t would have); the area is the mean of that step function over [0, T]. Scoring 256
problems costs about a minute a snapshot on 2 cores, so by default only the snapshots the table reads
are scored (the latest before each tabulated time, the last, the selected; `--score-all` for every
one): the area is then the mean over those. Snapshots are decoded as `evaluate` decodes (bf16 where
the CPU has bf16 units; `--score-dtype`), and the reference is scored once per results file.

    .venv/bin/python bench/seeds.py --task demo --seeds 0 1 2 3 4 --engines ours trl --minutes 8

writes bench/results/<machine>/seeds-<task>.json (every run's points, then the table) and the plot
beside it. `--table-only` redraws both from that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import describe, results_dir  # noqa: E402

# Held-out sets of 256 problems need more problems than the demo's ranges hold (2 x 10 x 18 = 360),
# so the tasks widen the second operand; the prompt, the format and the reward are the demo's.
TASKS = {
    "demo": [
        "data.generator.operators=['+', '*']",
        "data.generator.a_min=0",
        "data.generator.a_max=9",
        "data.generator.b_min=2",
        "data.generator.b_max=99",
        "data.generator.num_rows=1960",
        "data.eval_fraction=0.2",
        "data.max_eval_rows=256",
        "train.beta=0.04",
    ],
    # `make demo` itself: its problems (+ and *, 0-9 x 2-19, all 360 of them), its 30 steps, its
    # split (71 / 33 / 256 rows for train / val / test; until 2026-12-07 the demo's was 265 / 31 / 64,
    # and this task the only place with 256), its validation and selection, pinned here so that later
    # changes to params.yaml do not move it. Run it with --engines ours and --minutes long enough for
    # the 30 steps to finish.
    "demo-30steps": [
        "data.generator.operators=['+', '*']",
        "data.generator.a_min=0",
        "data.generator.a_max=9",
        "data.generator.b_min=2",
        "data.generator.b_max=19",
        "data.generator.num_rows=400",
        "data.eval_fraction=0.75",
        "data.max_eval_rows=256",
        "data.val_fraction=0.3",
        "train.beta=0.04",
        "train.steps=30",
        "train.dynamic_sampling=true",  # on in the demo (learning_run.py's engine settings have it off)
    ],
    # Issue 43's tool task: `grpo run --preset tools` (two- and three-digit multiplication with a
    # calculator), with 256 held-out problems; and the same problems and budget without the tool
    # (the math task: one worked example, one turn), the side-by-side baseline.
    "calculator": [
        "task=calculator",
        *(
            CALCULATOR_PROBLEMS := [
                "data.generator.operators=['*']",
                "data.generator.a_min=10",
                "data.generator.a_max=999",
                "data.generator.b_min=10",
                "data.generator.b_max=999",
                "data.generator.num_rows=1200",
                "data.eval_fraction=0.3",
                "data.max_eval_rows=256",
                "train.prompts_per_step=4",
                "train.max_completion_length=128",
                # Validation during training decodes as `evaluate` does: without this it stopped every
                # episode at evaluate's default 48 tokens and scored 0 (the 2026-12-07 seeds ran so).
                "evaluate.max_new_tokens=128",
            ]
        ),
    ],
    "calculator-no-tool": ["task=math", *CALCULATOR_PROBLEMS],
    "mul": [
        "data.generator.operators=['*']",
        "data.generator.a_min=1",
        "data.generator.a_max=9",
        "data.generator.b_min=2",
        "data.generator.b_max=99",
        "data.generator.num_rows=882",
        "data.eval_fraction=0.35",
        "data.max_eval_rows=256",
        "data.prompt.examples=[{question: 'What is 4 * 23?', answer: \"4 * 23 = 92\\n#### 92\"}]",
    ],
}


def at(points: list[dict], t: float, key: str = "accuracy") -> float:
    """The latest snapshot's value at or before `t` seconds (the reference before the first).

    >>> at([{"wall_time": 0, "accuracy": 0.1}, {"wall_time": 50, "accuracy": 0.5}], 60)
    0.5
    """
    curve = sorted((p for p in points if not p.get("selected")), key=lambda p: p["wall_time"])
    return [p[key] for p in curve if p["wall_time"] <= t][-1]


def area(points: list[dict], horizon: float, key: str = "accuracy") -> float:
    """Mean of the step function over [0, horizon] seconds.

    >>> area([{"wall_time": 0, "accuracy": 0.0}, {"wall_time": 50, "accuracy": 1.0}], 100)
    0.5
    """
    curve = sorted((p for p in points if not p.get("selected")), key=lambda p: p["wall_time"])
    total = 0.0
    for p, nxt in zip(curve, [*curve[1:], None], strict=True):
        end = min(horizon, nxt["wall_time"] if nxt else horizon)
        total += p[key] * max(0.0, end - min(p["wall_time"], horizon))
    return total / horizon


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(runs: dict[str, dict[int, list[dict]]], minutes: list[float], horizon: float) -> str:
    lines = [
        "| engine | seeds | "
        + " | ".join(f"{m:g} min" for m in minutes)
        + " | area (0-T) | lenient at T | selected | last |",
        "|---" * (len(minutes) + 6) + "|",
    ]
    for engine, by_seed in runs.items():
        seeds = sorted(by_seed)
        cells = [mean_sd([at(by_seed[s], m * 60) for s in seeds]) for m in minutes]
        lenient = mean_sd([at(by_seed[s], horizon, "lenient_accuracy") for s in seeds])
        selected = [next((p["accuracy"] for p in by_seed[s] if p.get("selected")), None) for s in seeds]
        chosen = mean_sd([x for x in selected if x is not None]) if all(x is not None for x in selected) else "-"
        last = mean_sd([[p for p in by_seed[s] if not p.get("selected")][-1]["accuracy"] for s in seeds])
        auc = mean_sd([area(by_seed[s], horizon) for s in seeds])
        lines.append(
            f"| {engine} | {len(seeds)} | " + " | ".join(cells) + f" | {auc} | {lenient} | {chosen} | {last} |"
        )
    return "\n".join(lines)


def selected(points: list[dict]) -> dict:
    """The selected snapshot (what `train` hands to `evaluate`), else the last one (select: last, TRL)."""
    return next((p for p in points if p.get("selected")), [p for p in points if not p.get("selected")][-1])


def per_seed(runs: dict[str, dict[int, list[dict]]]) -> str:
    """One row per (engine, seed): reference, selected and last, strict / lenient."""
    lines = [
        "| engine | seed | reference | selected (step) | last (step) |",
        "|---|---|---|---|---|",
    ]
    for engine, by_seed in runs.items():
        for seed in sorted(by_seed):
            ref, chosen = by_seed[seed][0], selected(by_seed[seed])
            last = [p for p in by_seed[seed] if not p.get("selected")][-1]
            lines.append(
                f"| {engine} | {seed} | {ref['accuracy']:.3f} / {ref['lenient_accuracy']:.3f} | "
                f"{chosen['accuracy']:.3f} / {chosen['lenient_accuracy']:.3f} ({chosen['step']}) | "
                f"{last['accuracy']:.3f} / {last['lenient_accuracy']:.3f} ({last['step']}) |"
            )
    return "\n".join(lines)


def selection_rules(by_seed: dict[int, list[dict]], tolerances: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)) -> list[str]:
    """Replay `train.select` on each seed's validation scores with other tolerances and read the
    chosen step's test accuracy against the last step's: which rule the defaults should use.

    Needs a run scored with `--score-all` (every validated step has a test score) by a learning_run.py
    that records each snapshot's validation score; the rule is the trainer's own (`Watch.selected`).
    """
    from pipelines.grpo.validation import Score, Watch

    curves = {s: [p for p in by_seed[s] if not p.get("selected") and p["step"] > 0] for s in sorted(by_seed)}
    curves = {s: c for s, c in curves.items() if c and all("val_accuracy" in p for p in c)}
    if not curves:
        return []
    out = []
    for tolerance in tolerances:
        gaps, steps = [], []
        for curve in curves.values():
            scores = [
                Score(p["step"], p["val_accuracy"], p["val_lenient_accuracy"], 0.0, 0.0, problems=p["val_problems"])
                for p in curve
            ]
            chosen = Watch(tolerance=tolerance, scores=scores).selected
            test = {p["step"]: p["accuracy"] for p in curve}
            gaps.append((test[chosen.step] - curve[-1]["accuracy"]) * curve[-1]["problems"])
            steps.append(chosen.step)
        out.append(
            f"select_tolerance {tolerance:g}: selected minus last {statistics.mean(gaps):+.1f} problems on the mean "
            f"(per seed {', '.join(f'{g:+.0f}' for g in gaps)}; steps {', '.join(map(str, steps))})"
        )
    return out


def targets(runs: dict[str, dict[int, list[dict]]], minutes: list[float], horizon: float) -> list[str]:
    """The issue's targets, each checked against the runs: `met` or `NOT met` with the numbers."""
    ours = runs.get("ours", {})
    out = []
    if ours:
        problems = ours[min(ours)][0]["problems"]
        chosen = [selected(ours[s]) for s in sorted(ours)]
        last = [[p for p in ours[s] if not p.get("selected")][-1] for s in sorted(ours)]
        worst = min(c["accuracy"] - la["accuracy"] for c, la in zip(chosen, last, strict=True)) * problems
        mean_gap = statistics.mean(c["accuracy"] - la["accuracy"] for c, la in zip(chosen, last, strict=True))
        ok = worst >= -1 and mean_gap > 0
        out.append(
            f"selected never below last by more than one problem, above it on the mean: {'met' if ok else 'NOT met'}"
            f" (worst seed {worst:+.0f} problems, mean {mean_gap:+.3f})"
        )
        refs = [ours[s][0]["lenient_accuracy"] for s in sorted(ours)]
        gaps = [c["lenient_accuracy"] - r for c, r in zip(chosen, refs, strict=True)]
        out.append(
            f"selected lenient not below the reference's on any seed: {'met' if min(gaps) >= 0 else 'NOT met'}"
            f" (per seed {', '.join(f'{g:+.3f}' for g in gaps)})"
        )
        gain = statistics.mean(gaps)
        verdict = "met" if gain >= 0.05 else "NOT met"
        out.append(f"lenient gain >= 5 points on the mean: {verdict} ({gain * 100:+.1f} points)")
    if ours and runs.get("trl"):
        trl = runs["trl"]
        behind = [
            m for m in minutes
            if statistics.mean(at(ours[s], m * 60) for s in ours) < statistics.mean(at(trl[s], m * 60) for s in trl)
        ]  # fmt: skip
        out.append(
            f"ours at or above TRL's mean at every time point: {'met' if not behind else 'NOT met'}"
            + (f" (behind at {', '.join(f'{m:g}' for m in behind)} min)" if behind else "")
        )
        a_ours = statistics.mean(area(ours[s], horizon) for s in ours)
        a_trl = statistics.mean(area(trl[s], horizon) for s in trl)
        out.append(f"ours ahead on the area: {'met' if a_ours > a_trl else 'NOT met'} ({a_ours:.3f} vs {a_trl:.3f})")
    return out


def tool_targets(shown: dict[str, dict[int, list[dict]]], horizon: float) -> list[str]:
    """Issue 43's target when the calculator runs are shown with their no-tool baseline: at least 0.8
    strict accuracy within the horizon with the tool, from a reference below 0.4 without it; and the
    independent check's agreement with the judge."""
    tool = next((by for name, by in shown.items() if name.startswith("ours") and "calculator-no-tool" not in name
                 and any("check_accuracy" in p for ps in by.values() for p in ps)), None)  # fmt: skip
    bare = next((by for name, by in shown.items() if "calculator-no-tool" in name), None)
    if tool is None or bare is None:
        return []
    reached = [max(p["accuracy"] for p in points if p["wall_time"] <= horizon) for points in tool.values()]
    reference = statistics.mean(points[0]["accuracy"] for points in bare.values())
    ok = min(reached) >= 0.8 and reference < 0.4
    gaps = [abs(p["accuracy"] - p["check_accuracy"]) for ps in [*tool.values(), *bare.values()] for p in ps]
    return [
        f"with the tool >= 0.8 strict within {horizon / 60:g} min, from a reference below 0.4 without it: "
        f"{'met' if ok else 'NOT met'} (best snapshot per seed {', '.join(f'{r:.3f}' for r in reached)}; "
        f"reference without the tool {reference:.3f})",
        f"the independent check (the product computed from the question, the last `#### N`) against the judge: "
        f"largest difference {max(gaps):.4f} over {len(gaps)} scored snapshots",
    ]


def paired(shown: dict[str, dict[int, list[dict]]], minutes: list[float], horizon: float) -> list[str]:
    """Each row's difference from the first row on the seeds both ran (seed-paired: same data, same
    held-out problems, same training seed), at each time point and on the area."""
    (first, base), *others = shown.items()
    out = []
    for name, by_seed in others:
        seeds = sorted(set(base) & set(by_seed))
        if not seeds:
            continue
        cells = [
            f"{m:g} min " + mean_sd([at(by_seed[s], m * 60) - at(base[s], m * 60) for s in seeds]) for m in minutes
        ]
        cells.append("area " + mean_sd([area(by_seed[s], horizon) - area(base[s], horizon) for s in seeds]))
        out.append(f"{name} minus {first}, {len(seeds)} paired seeds: " + "; ".join(cells))
    return out


def plot(runs: dict[str, dict[int, list[dict]]], out: Path, horizon: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = [horizon * i / 100 for i in range(101)]
    for engine, by_seed in runs.items():
        curves = [[at(points, t) for t in grid] for points in by_seed.values()]
        mean = [statistics.mean(c) for c in zip(*curves, strict=True)]
        sd = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*curves, strict=True)]
        xs = [t / 60 for t in grid]
        ax.plot(xs, mean, label=f"{engine} (mean of {len(curves)} seeds)")
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, sd, strict=True)],
            [m + s for m, s in zip(mean, sd, strict=True)],
            alpha=0.2,
        )
    ax.set_xlabel("training wall time (min, 2 CPU cores)")
    ax.set_ylabel("held-out strict accuracy (greedy), mean ± sd")
    ax.set_title(title)
    ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 0.1))  # one problem of 256 is not drawn as a leap
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=sorted(TASKS), default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--engines", nargs="+", default=["ours", "trl"])
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--points", type=float, nargs="+", default=[1, 2, 4, 8], help="minutes at which to tabulate")
    ap.add_argument("--every", type=int, default=5, help="snapshot every N steps (ours)")
    # TRL's step is 3-4x longer than ours here, so it is snapshotted every 2 steps: both curves then
    # get a point about every 25 s and neither is read off a stale snapshot at the tabulated times.
    ap.add_argument("--trl-every", type=int, default=2, help="snapshot every N steps (TRL)")
    ap.add_argument("--trl-prompts", type=int, default=2, help="prompts per TRL step: the demo's prompts_per_step")
    ap.add_argument("-S", "--set", action="append", default=[], help="override for every run")
    ap.add_argument("--score-all", action="store_true", help="score every snapshot, not only those the table reads")
    ap.add_argument("--score-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--chat-template",
        help="one of TRL's bundled templates on the reference's tokenizer, for every engine (learning_run.py); "
        "qwen2_5 lets TRL call tools",
    )
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep the (engine, seed) runs already in the results file")
    ap.add_argument(
        "--baseline", type=Path, nargs="+", default=[],
        help="other results files (same task and seeds, e.g. the defaults) tabulated above this one's runs, "
        "each engine named with its file's extra overrides",
    )  # fmt: skip
    args = ap.parse_args()
    out = args.out or results_dir() / f"seeds-{args.task}.json"
    points = [m for m in args.points if m <= args.minutes]
    out.parent.mkdir(parents=True, exist_ok=True)  # the reference's cache goes beside it from the first run
    if args.table_only:
        saved = json.loads(out.read_text())
        runs = {e: {int(s): p for s, p in by.items()} for e, by in saved["runs"].items()}
    else:
        runs = {}
        if args.resume and out.exists():
            runs = {e: {int(s): p for s, p in by.items()} for e, by in json.loads(out.read_text())["runs"].items()}
        for seed in args.seeds:
            for engine in args.engines:  # engines alternate within a seed: a slow spell hits both
                if seed in runs.get(engine, {}):
                    continue
                run_out = Path(tempfile.mkdtemp(prefix="grpo-seeds-")) / "run.json"
                cmd = [
                    sys.executable, str(REPO / "bench" / "learning_run.py"), "--engines", engine,
                    "--minutes", str(args.minutes), "--out", str(run_out), "--title", args.task, "--target", "0",
                    "--every", str(args.trl_every if engine == "trl" else args.every),
                    "--trl-prompts", str(args.trl_prompts), "--score-dtype", args.score_dtype,
                    "--reference-cache", str(out.with_name(out.stem + "-reference.json")),
                ]  # fmt: skip
                if not args.score_all:
                    cmd += ["--score-at", *map(str, [*points, args.minutes])]
                if args.chat_template:
                    cmd += ["--chat-template", args.chat_template]
                for override in [*TASKS[args.task], f"train.seed={seed}", *args.set]:
                    cmd += ["-S", override]
                subprocess.run(cmd, check=True)
                runs.setdefault(engine, {})[seed] = json.loads(run_out.read_text())["results"][engine]
                partial = {
                    "machine": describe(),
                    "task": args.task,
                    "overrides": TASKS[args.task] + args.set,
                    "score_dtype": args.score_dtype,
                    "chat_template": args.chat_template,
                    "scored": "all snapshots" if args.score_all else "the snapshots the table reads",
                }
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({**partial, "minutes": args.minutes, "runs": runs}, indent=2))
    shown = runs
    if args.baseline:
        shown = {}
        for path in [*args.baseline, out]:
            saved = json.loads(path.read_text())
            extra = ", ".join(saved["overrides"][len(TASKS[saved["task"]]) :]) or "defaults"
            label = extra if saved["task"] == args.task else f"{saved['task']}, {extra}"
            for engine, by_seed in saved["runs"].items():
                shown[f"{engine} ({label})"] = {int(s): p for s, p in by_seed.items()}
    text = "\n\n".join(
        [
            table(shown, points, args.minutes * 60),
            per_seed(runs),
            "\n".join(
                f"- {line}"
                for line in [
                    *paired(shown, points, args.minutes * 60),
                    *targets(runs, points, args.minutes * 60),
                    *tool_targets(shown, args.minutes * 60),
                    *selection_rules(runs.get("ours", {})),
                ]
            ),
        ]
    )
    saved = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**saved, "table": text}, indent=2))
    template = saved.get("chat_template") or args.chat_template
    title = f"{args.task}{f', {template} template' if template else ''}: held-out accuracy over seeds"
    plot(shown, out.with_suffix(".png"), args.minutes * 60, title)
    print(text)


if __name__ == "__main__":
    main()
