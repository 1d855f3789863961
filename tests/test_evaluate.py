"""Evaluation: paired statistics on hand-made outcomes, and the report from per-problem outcomes."""

from __future__ import annotations

import json
import random

import pytest

from pipelines.config import EvaluateConfig
from pipelines.evaluation import scoring, stats
from pipelines.evaluation import stage as evaluate
from pipelines.paths import Paths


def outcome(
    model: str, i: int, correct: bool, *, fmt: bool = True, k: int = 2, sampled_right: int | None = None
) -> dict:
    """One per-problem row as pipelines/evaluation/scoring.py writes it."""
    right = (k if correct else 0) if sampled_right is None else sampled_right
    samples = [
        {
            "completion": "#### 1" if j < right else "#### 2",
            "extracted": "1" if j < right else "2",
            "correct": j < right,
            "format": fmt,
            "length": 3,
            "truncated": False,
        }
        for j in range(k)
    ]
    return {
        "model": model,
        "id": f"q{i}",
        "answer": "1",
        "completion": "#### 1" if correct else "#### 2",
        "correct": correct,
        "format": fmt,
        "lenient": correct,
        "length": 3,
        "truncated": False,
        "samples": samples,
        "pass_at_k": right > 0,
        "mean_at_k": right / k,
        "majority_answer": scoring.majority_answer([s["extracted"] for s in samples]),
        "maj_at_k": scoring.majority_answer([s["extracted"] for s in samples]) == "1",
    }


def outcomes(model: str, pattern: list[bool], **kw) -> list[dict]:
    return [outcome(model, i, c, **kw) for i, c in enumerate(pattern)]


@pytest.mark.parametrize("b,c", [(0, 0), (5, 0), (0, 5), (3, 7), (10, 2), (12, 12), (1, 30)])
def test_mcnemar_exact_matches_scipy_binomial_test(b, c):
    scipy_stats = pytest.importorskip("scipy.stats")
    cand = [True] * b + [False] * c + [True] * 4 + [False] * 3
    other = [False] * b + [True] * c + [True] * 4 + [False] * 3
    got = stats.mcnemar_exact(cand, other)
    assert (got.candidate_only, got.other_only) == (b, c)
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
    assert got.p_value == pytest.approx(expected, rel=1e-9)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    rng = random.Random(1)
    diffs = [rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0]) for _ in range(64)]
    a = stats.bootstrap_interval(diffs, resamples=2000, confidence=0.95, seed=7)
    assert a == stats.bootstrap_interval(diffs, resamples=2000, confidence=0.95, seed=7)
    assert a[0] < sum(diffs) / len(diffs) < a[1]
    narrow = stats.bootstrap_interval(diffs, resamples=2000, confidence=0.5, seed=7)
    assert a[0] <= narrow[0] <= narrow[1] <= a[1]


def test_paired_comparison_rejects_unpaired_outcomes():
    with pytest.raises(ValueError, match="same length"):
        stats.paired_comparison([True], [True, False], resamples=100, confidence=0.9, seed=0)


def test_summarize_pass_mean_and_majority_at_k():
    rows = [
        outcome("policy", 0, True, k=4, sampled_right=1),
        outcome("policy", 1, False, k=4, sampled_right=3),
        outcome("policy", 2, False, k=4, sampled_right=0),
    ]
    s = scoring.summarize(rows)
    assert s["accuracy"] == pytest.approx(1 / 3)
    assert s["pass_at_k"] == pytest.approx(2 / 3)  # any of the 4 right
    assert s["mean_at_k"] == pytest.approx((1 / 4 + 3 / 4 + 0) / 3)
    assert s["maj_at_k"] == pytest.approx(1 / 3)  # only the 3-of-4 problem has a right majority
    assert s["k"] == 4 and s["problems"] == 3


def test_report_shows_candidate_reference_and_champion_with_intervals_and_chart(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labelled = []  # the figures written on the chart's bars, per model
    original = Axes.bar_label
    monkeypatch.setattr(Axes, "bar_label", lambda ax, bars, **kw: labelled.append(bars) or original(ax, bars, **kw))
    paths = Paths(tmp_path)
    cfg = EvaluateConfig(k=2, bootstrap_samples=500)
    n = 20
    result = evaluate.write_outputs(
        paths,
        cfg,
        {
            "reference": outcomes("reference", [i < 5 for i in range(n)]),
            "champion": [dict(o, version="3") for o in outcomes("champion", [i < 8 for i in range(n)])],
            "policy": outcomes("policy", [i < 16 for i in range(n)]),
        },
        champion_version="3",
        candidate_sha256="c" * 64,
        reference_sha256="r" * 64,
    )
    assert result.champion_version == "3" and result.policy["accuracy"] == pytest.approx(0.8)

    metrics = json.loads(paths.eval_results.read_text())
    assert metrics["reference"]["accuracy"] == pytest.approx(0.25) and "format_rate" in metrics["policy"]
    # What `dvc metrics show` compares: the candidate's headline figures only (the rest is in reports/eval.json).
    headline = json.loads(paths.eval_metrics.read_text())
    assert set(headline) == {"accuracy", "lenient_accuracy", "pass_at_k", "format_rate", "gain"}
    assert headline["accuracy"] == pytest.approx(0.8) and headline["gain"] == pytest.approx(0.55)
    assert metrics["champion"]["accuracy"] == pytest.approx(0.4) and metrics["champion_version"] == "3"
    vs = metrics["comparison"]["policy_vs_champion"]
    assert vs["diff"] == pytest.approx(0.4) and 0 < vs["ci_low"] <= 0.4 <= vs["ci_high"]
    assert vs["mcnemar"] == {"candidate_only": 8, "other_only": 0, "p_value": pytest.approx(2 / 2**8)}
    assert metrics["comparison"]["policy_vs_reference"]["diff"] == pytest.approx(0.55)

    text = paths.eval_report.read_text()
    assert "| metric | reference | champion v3 | candidate |" in text
    assert "| champion v3 | +0.400 | [" in text and "McNemar" in text
    assert "![accuracy of reference, champion and candidate](eval.png)" in text
    png = paths.eval_chart
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # one labelled bar per chart metric (lenient among them) for each of the three models
    assert len(labelled) == 3 and all(len(bars) == 6 for bars in labelled)
    candidate = [bar.get_height() for bar in labelled[2]]
    assert candidate[4] == pytest.approx(metrics["policy"]["lenient_accuracy"])

    rows = [json.loads(line) for line in paths.eval_samples.read_text().splitlines()]
    assert len(rows) == 3 * n and {r["model"] for r in rows} == {"reference", "champion", "policy"}
    assert all(len(r["samples"]) == 2 for r in rows)


def test_report_without_champion_says_so(tmp_path):
    paths = Paths(tmp_path)
    evaluate.write_outputs(
        paths,
        EvaluateConfig(bootstrap_samples=100),
        {"reference": outcomes("reference", [False, True]), "policy": outcomes("policy", [True, True])},
        champion_version=None,
        candidate_sha256="c",
        reference_sha256="r",
    )
    metrics = json.loads(paths.eval_results.read_text())
    assert metrics["champion"] is None and metrics["comparison"]["policy_vs_champion"] is None
    text = paths.eval_report.read_text()
    assert "No champion in the registry yet." in text and "no champion column" not in text
    assert "| metric | reference | candidate |\n|---|---:|---:|\n" in text  # and no column of dashes for one


def test_compare_refuses_outcomes_on_different_problems():
    with pytest.raises(ValueError, match="same problems"):
        evaluate.compare(
            {
                "reference": outcomes("reference", [True, False]),
                "policy": list(reversed(outcomes("policy", [True, False]))),
            },
            EvaluateConfig(bootstrap_samples=100),
        )
