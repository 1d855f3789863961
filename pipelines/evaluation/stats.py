"""Paired statistics over problems: bootstrap interval of a difference, McNemar's exact test.

Every model answers the same problems, so each comparison is paired: the interval comes from
resampling problems (not answers), and McNemar's test looks only at the problems where the two
models disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def bootstrap_interval(
    differences: Sequence[float], *, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile interval of the mean of per-problem differences, resampling problems (seeded).

    >>> bootstrap_interval([1.0, 1.0, 1.0], resamples=200, confidence=0.95, seed=0)
    (1.0, 1.0)
    >>> lo, hi = bootstrap_interval([1, 0, -1, 1, 0, 1, 1, 0], resamples=2000, confidence=0.9, seed=0)
    >>> lo < 0.375 < hi
    True
    """
    import numpy as np

    values = np.asarray(differences, dtype=float)
    if values.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # Round away float noise so that an all-equal sample gives exactly its value.
    return (round(float(low), 12), round(float(high), 12))


@dataclass(frozen=True)
class McNemar:
    candidate_only: int  # problems the candidate gets right and the other model wrong
    other_only: int  # and the reverse
    p_value: float


def mcnemar_exact(candidate: Sequence[bool], other: Sequence[bool]) -> McNemar:
    """McNemar's exact (binomial) test on paired right/wrong outcomes, two-sided.

    Under "no difference" the discordant problems split like fair coin flips.

    >>> mcnemar_exact([True] * 5 + [False], [False] * 5 + [False])
    McNemar(candidate_only=5, other_only=0, p_value=0.0625)
    >>> mcnemar_exact([True, False], [False, True]).p_value
    1.0
    """
    if len(candidate) != len(other):
        raise ValueError(f"paired outcomes must have the same length: {len(candidate)} vs {len(other)}")
    b = sum(1 for c, o in zip(candidate, other, strict=True) if c and not o)
    c = sum(1 for cand, o in zip(candidate, other, strict=True) if o and not cand)
    n = b + c
    if n == 0:
        return McNemar(b, c, 1.0)
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return McNemar(b, c, min(1.0, 2.0 * tail))


def paired_comparison(
    candidate: Sequence[bool],
    other: Sequence[bool],
    *,
    resamples: int,
    confidence: float,
    seed: int,
    candidate_mean_at_k: Sequence[float] | None = None,
    other_mean_at_k: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Accuracy difference (candidate - other) with its bootstrap interval and McNemar's test.

    With per-problem mean@k fractions, the same for mean@k.

    >>> out = paired_comparison([True, True], [False, True], resamples=100, confidence=0.9, seed=0)
    >>> out["diff"], out["mcnemar"]["candidate_only"]
    (0.5, 1)
    """
    if len(candidate) != len(other):
        raise ValueError(f"paired outcomes must have the same length: {len(candidate)} vs {len(other)}")
    n = len(candidate)
    diffs = [float(a) - float(b) for a, b in zip(candidate, other, strict=True)]
    low, high = bootstrap_interval(diffs, resamples=resamples, confidence=confidence, seed=seed)
    result: dict[str, Any] = {
        "problems": n,
        "candidate": sum(candidate) / n if n else 0.0,
        "other": sum(other) / n if n else 0.0,
        "diff": sum(diffs) / n if n else 0.0,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "mcnemar": asdict(mcnemar_exact(candidate, other)),
    }
    if candidate_mean_at_k is not None and other_mean_at_k is not None:
        k_diffs = [a - b for a, b in zip(candidate_mean_at_k, other_mean_at_k, strict=True)]
        k_low, k_high = bootstrap_interval(k_diffs, resamples=resamples, confidence=confidence, seed=seed)
        result["mean_at_k"] = {"diff": sum(k_diffs) / n if n else 0.0, "ci_low": k_low, "ci_high": k_high}
    return result
