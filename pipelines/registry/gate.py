"""The promotion gate: does a candidate take `champion`? A pure function of per-problem outcomes.

The evidence is paired: the candidate, the champion and the reference answered the same held-out
problems (pipelines/evaluation/stage.py), so the gain over the champion is judged with a bootstrap interval
over problems, not against a score the champion once got on other problems. With no champion yet,
the reference stands in for it: a first version must beat the model it was trained from by the same
rules (gain, interval), never take `champion` merely by not being worse. Every rule in `registry:`
(params.yaml) must hold; the reason names each one that failed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import EvaluateConfig, RegisterConfig
from pipelines.evaluation.stats import paired_comparison


@dataclass(frozen=True)
class Evidence:
    """Per-problem greedy outcomes (True = right), aligned problem by problem."""

    candidate: Sequence[bool]
    reference: Sequence[bool]
    champion: Sequence[bool] | None  # None: there is no champion yet
    candidate_format_rate: float
    champion_version: str | None = None
    # Lenient outcomes (the task's lenient reading; math: the last number is right), for no_skill_regression.
    candidate_lenient: Sequence[bool] | None = None
    reference_lenient: Sequence[bool] | None = None
    # {name: sha256} of the verifiers (pipelines/verifiers/versions.py) that scored this evaluation,
    # and those the champion was registered with (None: not recorded). When they differ, the champion's
    # outcomes above are still today's: evaluation re-scored it with today's verifiers; the reason says so.
    verifiers: dict[str, str] | None = None
    champion_verifiers: dict[str, str] | None = None
    # The judge against training's correctness reward on the last ledger step (evaluation/agreement.py):
    # (completions where they disagree, completions checked); None = not checked (no ledger).
    judge_disagreements: tuple[int, int] | None = None


@dataclass
class Decision:
    promote: bool
    reason: str
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def decide(evidence: Evidence, rules: RegisterConfig, stats: EvaluateConfig) -> Decision:
    """Promote only when every rule holds; the reason says which held and which did not.

    >>> from pipelines.config import EvaluateConfig, RegisterConfig
    >>> better = Evidence([True] * 8, [False] * 8, [False] * 8, 1.0, "1")
    >>> decide(better, RegisterConfig(), EvaluateConfig()).promote
    True
    >>> worse = Evidence([False] * 8, [False] * 8, [True] * 8, 1.0, "1")
    >>> decide(worse, RegisterConfig(), EvaluateConfig()).promote
    False
    """
    n = len(evidence.candidate)
    if not math.isfinite(evidence.candidate_format_rate):
        return Decision(
            False, f"the candidate's format rate is {evidence.candidate_format_rate}: run `grpo evaluate` again"
        )
    if len(evidence.reference) != n or (evidence.champion is not None and len(evidence.champion) != n):
        raise ValueError("candidate, reference and champion outcomes must cover the same problems")
    if n == 0:
        return Decision(False, "no evaluated problems: run `grpo evaluate` on a non-empty eval split")
    settings = {"resamples": stats.bootstrap_samples, "confidence": stats.confidence, "seed": stats.seed}
    vs_reference = paired_comparison(evidence.candidate, evidence.reference, **settings)
    checks: dict[str, bool] = {}
    notes: list[str] = []
    figures: dict[str, Any] = {"accuracy": vs_reference["candidate"], "gain_vs_reference": vs_reference["diff"]}

    _standing_checks(evidence, rules, settings, vs_reference, checks, notes, figures)

    if evidence.champion is None:
        # No champion to beat: the reference is the bar, by the rules a champion would set.
        _gain_checks(vs_reference, "reference", n, rules, stats, checks, notes)
        figures.update(_gain_figures(vs_reference))
        verdict = all(checks.values())
        head = "no champion yet, so the candidate must beat the reference"
        return Decision(verdict, _reason(verdict, head, checks, notes), checks, figures)

    vs_champion = paired_comparison(evidence.candidate, evidence.champion, **settings)
    head = f"vs champion v{evidence.champion_version}"
    if evidence.verifiers and {k: (evidence.champion_verifiers or {}).get(k) for k in evidence.verifiers} != dict(
        evidence.verifiers
    ):
        today = ", ".join(f"{k}={v[:8]}" for k, v in sorted(evidence.verifiers.items()))
        head += f" (champion re-scored with today's verifiers ({today}))"
    figures.update({"champion_accuracy": vs_champion["other"], "gain_vs_champion": vs_champion["diff"]})
    figures.update(_gain_figures(vs_champion))
    _gain_checks(vs_champion, f"champion v{evidence.champion_version}", n, rules, stats, checks, notes)
    verdict = all(checks.values())
    return Decision(verdict, _reason(verdict, head, checks, notes), checks, figures)


def _standing_checks(
    evidence: Evidence,
    rules: RegisterConfig,
    settings: dict[str, Any],
    vs_reference: dict[str, Any],
    checks: dict[str, bool],
    notes: list[str],
    figures: dict[str, Any],
) -> None:
    """The rules that do not depend on the bar (champion or reference): format rate, no regression below the
    reference, no skill lost, judge agreement, the accuracy floor; each adds its check, note and figures."""
    checks["min_format_rate"] = evidence.candidate_format_rate >= rules.min_format_rate
    notes.append(
        f"format rate {evidence.candidate_format_rate:.3f} {'>=' if checks['min_format_rate'] else '<'} "
        f"{rules.min_format_rate}"
    )
    if rules.no_regression_vs_reference:
        checks["no_regression_vs_reference"] = vs_reference["diff"] >= 0
        notes.append(
            f"accuracy {vs_reference['candidate']:.3f} vs reference {vs_reference['other']:.3f} "
            f"({'no regression' if checks['no_regression_vs_reference'] else 'regression'})"
        )

    if rules.no_skill_regression:
        if evidence.candidate_lenient is None or evidence.reference_lenient is None:
            checks["no_skill_regression"] = False
            notes.append("no lenient outcomes to judge skill by: run `grpo evaluate` again")
        else:
            lenient = paired_comparison(evidence.candidate_lenient, evidence.reference_lenient, **settings)
            cand, ref = lenient["candidate"], lenient["other"]
            checks["no_skill_regression"] = cand >= ref
            figures["lenient_accuracy"] = cand
            notes.append(f"lenient accuracy {cand:.3f} vs reference {ref:.3f} " + _skill_verdict(lenient))

    if rules.require_judge_agreement and evidence.judge_disagreements is not None:
        wrong, checked = evidence.judge_disagreements
        checks["judge_agrees_with_reward"] = wrong == 0
        notes.append(
            f"the judge and training's correctness reward agree on all {checked} ledger completions"
            if wrong == 0
            else f"the judge and training's correctness reward disagree on {wrong} of {checked} ledger completions: "
            "the accuracy above is not what training rewarded (reports/eval.md, Task and judge)"
        )

    if rules.min_accuracy > 0:
        checks["min_accuracy"] = vs_reference["candidate"] >= rules.min_accuracy
        notes.append(
            f"accuracy {vs_reference['candidate']:.3f} {'>=' if checks['min_accuracy'] else '<'} "
            f"floor {rules.min_accuracy}"
        )


def _skill_verdict(lenient: dict[str, Any]) -> str:
    """What a lenient fall means: the rule is strict (any fall fails it), but a fall of a problem or
    two on a small test split is also what two equally skilled models show, and the reader should know
    which of the two they are looking at."""
    if lenient["diff"] >= 0:
        return "(no skill lost)"
    n = lenient["problems"]
    lost = round(-lenient["diff"] * n)
    interval = f"{lenient['confidence']:.0%} interval [{lenient['ci_low']:+.3f}, {lenient['ci_high']:+.3f}]"
    if lenient["ci_high"] > 0:
        return (
            f"(skill lost: {lost} of {n} problems, {interval}, which holds zero: within the noise of {n} "
            "problems; a larger `data.max_eval_rows` tells them apart, `grpo promote VERSION --reason ...` "
            "promotes by hand)"
        )
    return f"(skill lost: {lost} of {n} problems, {interval}: the gain is format only)"


def _gain_figures(comparison: dict[str, Any]) -> dict[str, Any]:
    return {
        "gain_ci_low": comparison["ci_low"],
        "gain_ci_high": comparison["ci_high"],
        "mcnemar_p": comparison["mcnemar"]["p_value"],
    }


def _gain_checks(
    comparison: dict[str, Any],
    bar: str,
    n: int,
    rules: RegisterConfig,
    stats: EvaluateConfig,
    checks: dict[str, bool],
    notes: list[str],
) -> None:
    """`min_gain` and `ci_above_zero` against `bar` (the champion, or the reference when there is none)."""
    gain, low, high = comparison["diff"], comparison["ci_low"], comparison["ci_high"]
    checks["min_gain"] = gain > 0 and gain >= rules.min_gain
    notes.insert(
        0,
        f"accuracy {comparison['candidate']:.3f} vs {bar} {comparison['other']:.3f} on the same {n} problems: "
        f"gain {gain:+.3f} (needs > 0 and >= {rules.min_gain}), {stats.confidence:.0%} interval "
        f"[{low:+.3f}, {high:+.3f}], McNemar p={comparison['mcnemar']['p_value']:.3g}",
    )
    if rules.require_ci_above_zero:
        checks["ci_above_zero"] = low > 0
        notes.insert(1, f"interval lower end {low:+.3f} {'>' if checks['ci_above_zero'] else '<='} 0")


def _reason(verdict: bool, head: str, checks: dict[str, bool], notes: list[str]) -> str:
    failed = [name for name, ok in checks.items() if not ok]
    summary = "all gate rules hold" if verdict else "failed " + ", ".join(failed)
    return f"{head}: {summary}; " + "; ".join(notes)
