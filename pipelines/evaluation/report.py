"""The evaluation report: a Markdown table of the three models, the paired comparisons, a bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import EvaluateConfig
from pipelines.io import replaced_file

MODELS = ("reference", "champion", "policy")

ROWS = (
    ("accuracy (greedy pass@1, the task's strict verdict)", "accuracy"),
    ("pass@k (sampled)", "pass_at_k"),
    ("maj@k (majority vote)", "maj_at_k"),
    ("mean@k (sampled)", "mean_at_k"),
    ("lenient (greedy; the task's looser reading)", "lenient_accuracy"),
    ("format rate (greedy)", "format_rate"),
    ("format rate (sampled)", "sample_format_rate"),
    ("mean completion tokens (greedy)", "mean_length"),
    ("truncation rate (greedy)", "truncation_rate"),
)

CHART_METRICS = (
    ("accuracy", "pass@1"),
    ("pass_at_k", "pass@k"),
    ("maj_at_k", "maj@k"),
    ("mean_at_k", "mean@k"),
    ("lenient_accuracy", "lenient"),
    ("format_rate", "format"),
)


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def markdown(evaluation: dict[str, Any], cfg: EvaluateConfig, chart: str | None) -> str:
    """eval.md from the contents of reports/eval.json."""
    champion = evaluation.get("champion")
    version = evaluation.get("champion_version")
    problems = int(evaluation["policy"]["problems"])
    pct = f"{cfg.confidence:.0%}"
    champion_title = f"champion v{version}" if version else "champion"
    # A column of dashes under "champion" read as a champion that scored nothing: no champion, no column.
    models = MODELS if champion else tuple(m for m in MODELS if m != "champion")
    titles = {"reference": "reference", "champion": champion_title, "policy": "candidate"}
    lines = [
        "# Evaluation on the held-out split",
        "",
        f"{problems} problems; every model answers the same problems with the same decoding: greedy for pass@1,",
        f"k={cfg.k} samples at temperature {cfg.temperature} (top_p {cfg.top_p}, seed {cfg.seed}) for pass@k, maj@k "
        "and mean@k.",
        "Candidate = models/policy (the `policy` entry of reports/eval.json). "
        + (
            f"Champion = v{version} from the registry"
            + (" (scored on its own base)." if evaluation.get("champion_own_base") else ".")
            if champion
            else "No champion in the registry yet."
        ),
        "",
        "| metric | " + " | ".join(titles[m] for m in models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for title, key in ROWS:
        values = [(evaluation.get(m) or {}).get(key) for m in models]
        if all(v is None for v in values):
            continue
        lines.append(f"| {title} | " + " | ".join(_num(v) for v in values) + " |")

    lines += [
        "",
        "## Paired comparison on the same problems",
        "",
        f"Difference of accuracy (candidate − other) with its {pct} bootstrap interval over problems "
        f"({cfg.bootstrap_samples} resamples, seed {cfg.seed}), and McNemar's exact test on the problems where the "
        "two disagree.",
        "",
        f"| candidate vs | accuracy diff | {pct} interval | McNemar p | candidate only / other only | mean@k diff "
        f"[{pct} interval] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for other, title in (("reference", "reference"), ("champion", champion_title)):
        comp = (evaluation.get("comparison") or {}).get(f"policy_vs_{other}")
        if not comp:
            lines.append(f"| {title} | – | – | – | – | – |")
            continue
        mc = comp["mcnemar"]
        k = comp.get("mean_at_k")
        k_text = f"{_num(k['diff'], True)} [{_num(k['ci_low'], True)}, {_num(k['ci_high'], True)}]" if k else "–"
        lines.append(
            f"| {title} | {_num(comp['diff'], True)} | [{_num(comp['ci_low'], True)}, {_num(comp['ci_high'], True)}] "
            f"| {mc['p_value']:.3g} | {mc['candidate_only']} / {mc['other_only']} | {k_text} |"
        )
    if chart:
        lines += ["", f"![accuracy of reference, champion and candidate]({chart})"]
    lines += ["", *task_lines(evaluation), "", "Per-problem answers and verdicts: `reports/eval-samples.jsonl`."]
    return "\n".join(lines) + "\n"


def task_lines(evaluation: dict[str, Any]) -> list[str]:
    """Which task judged, its judge's version, and whether the judge agrees with training's reward.

    >>> task_lines({"task": {"name": "countdown", "description": "an expression", "lenient": "lenient"},
    ...             "verifiers": {"judge": "ab" * 32}, "agreement": {"step": 2, "reward": "countdown", "checked": 8,
    ...             "disagreements": 0, "share": 0.0}})[2]
    '- the judge and the training reward `countdown` agree on all 8 completions of training step 2 (the rollout ledger)'
    """
    task = evaluation.get("task") or {"name": "math", "description": "", "lenient": "last number right"}
    judge = (evaluation.get("verifiers") or {}).get("judge", "")
    lines = [
        "## Task and judge",
        f"- judged by task `{task['name']}`: {task.get('description') or 'a task of your own'} "
        f"(judge sha256 {judge[:12]}; lenient reading: {task.get('lenient')})",
    ]
    agreement = evaluation.get("agreement")
    if not agreement:
        lines.append("- no rollout ledger to check the judge against training's reward (train.ledger_every: 0)")
    elif not agreement.get("checked"):
        lines.append(f"- not checked against training's reward: {agreement.get('note', 'no completions to check')}")
    elif agreement["disagreements"] == 0:
        lines.append(
            f"- the judge and the training reward `{agreement['reward']}` agree on all {agreement['checked']} "
            f"completions of training step {agreement['step']} (the rollout ledger)"
        )
    else:
        lines.append(
            f"- **the judge and the training reward `{agreement['reward']}` disagree on {agreement['disagreements']} "
            f"of {agreement['checked']} completions ({agreement['share']:.1%}) of training step {agreement['step']}**: "
            "training rewarded what evaluation does not count (or the reverse); fix the task so they agree"
        )
    return lines


def chart(evaluation: dict[str, Any], out: Path) -> Path:
    """Bars of the main rates per model, and the paired differences with their intervals."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    present = [m for m in MODELS if evaluation.get(m)]
    labels = {
        "reference": "reference",
        "champion": f"champion v{evaluation.get('champion_version')}",
        "policy": "candidate",
    }
    colors = {"reference": "#9e9e9e", "champion": "#f28e2b", "policy": "#4e79a7"}
    fig, (bars, diffs) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=[3, 2])
    metrics = [(key, title) for key, title in CHART_METRICS if any(key in evaluation[m] for m in present)]
    width = 0.8 / max(len(present), 1)
    for i, model in enumerate(present):
        xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(metrics))]
        drawn = bars.bar(
            xs, [evaluation[model].get(key, 0.0) for key, _ in metrics], width, label=labels[model], color=colors[model]
        )
        bars.bar_label(drawn, fmt="%.2f", fontsize=6, padding=1)  # the figures, not only their heights
    bars.set_xticks(range(len(metrics)), [title for _, title in metrics])
    bars.set_ylim(0, 1.2)  # headroom for the legend above bars at 1.0
    bars.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bars.set_ylabel("rate over problems")
    bars.legend(loc="upper center", ncol=len(present), fontsize=8)
    bars.grid(axis="y", alpha=0.3)

    comps = [
        (other, c)
        for other in ("reference", "champion")
        if (c := (evaluation.get("comparison") or {}).get(f"policy_vs_{other}"))
    ]
    for y, (other, comp) in enumerate(comps):
        diffs.errorbar(
            comp["diff"],
            y,
            xerr=[[comp["diff"] - comp["ci_low"]], [comp["ci_high"] - comp["diff"]]],
            fmt="o",
            color=colors["champion" if other == "champion" else "reference"],
            capsize=4,
        )
    diffs.axvline(0, color="black", linewidth=0.8)
    diffs.set_yticks(range(len(comps)), [f"vs {labels[o]}" for o, _ in comps])
    diffs.set_ylim(-0.5, max(len(comps), 1) - 0.5)
    diffs.set_xlabel("candidate − other, accuracy (interval)")
    diffs.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Held-out evaluation, {int(evaluation['policy']['problems'])} problems")
    fig.tight_layout()
    with replaced_file(out) as tmp:  # beside it, then one rename: a reader never sees half a PNG
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
