"""bench/seeds.py's arithmetic (the numbers the learning tables and their targets are read from) and
bench/machine.py's folder names (which results may be compared)."""

from __future__ import annotations

import pytest

from bench.machine import slug
from bench.seeds import area, at, paired, per_seed, selection_rules, table, targets


def curve(*points: tuple[int, float, float], selected: int | None = None, problems: int = 256) -> list[dict]:
    """Snapshots as learning_run.py writes them: (step, wall seconds, accuracy); lenient = strict."""
    out = [
        {"step": s, "wall_time": t, "accuracy": a, "lenient_accuracy": a, "problems": problems} for s, t, a in points
    ]
    if selected is not None:
        out.append({**next(p for p in out if p["step"] == selected), "selected": True})
    return out


def test_at_reads_the_latest_snapshot_and_ignores_the_selected_copy():
    points = curve((0, 0, 0.2), (5, 50, 0.4), (10, 100, 0.3), selected=5)
    assert at(points, 49) == 0.2 and at(points, 50) == 0.4 and at(points, 240) == 0.3


def test_area_is_the_time_weighted_mean_of_the_step_function():
    points = curve((0, 0, 0.2), (5, 60, 0.4), (10, 180, 0.6))
    assert area(points, 240) == pytest.approx((0.2 * 60 + 0.4 * 120 + 0.6 * 60) / 240)
    # a snapshot past the horizon does not count
    assert area(curve((0, 0, 0.2), (5, 300, 1.0)), 240) == pytest.approx(0.2)


def runs_for_targets() -> dict[str, dict[int, list[dict]]]:
    return {
        "ours": {
            0: curve((0, 0, 0.30), (10, 50, 0.40), (20, 230, 0.36), selected=10),  # best kept: +0.04
            1: curve((0, 0, 0.30), (10, 50, 0.34), (20, 230, 0.38), selected=20),  # last selected
        },
        "trl": {
            0: curve((0, 0, 0.30), (4, 55, 0.42), (10, 200, 0.33)),
            1: curve((0, 0, 0.30), (4, 55, 0.40), (10, 200, 0.33)),
        },
    }


def test_table_rows_have_as_many_cells_as_the_header():
    text = table(runs_for_targets(), [1, 2, 4], 240)
    widths = {line.count("|") for line in text.splitlines()}
    assert len(widths) == 1, text
    assert "| ours | 2 | 0.370 ± 0.042 |" in text


def test_targets_name_what_is_met_and_what_is_not():
    lines = targets(runs_for_targets(), [1, 2, 4], 240)
    verdicts = {line.split(":")[0]: line for line in lines}
    assert verdicts["selected never below last by more than one problem, above it on the mean"].endswith(
        ": met (worst seed +0 problems, mean +0.020)"
    )
    assert verdicts["lenient gain >= 5 points on the mean"].endswith(": met (+9.0 points)")
    # TRL leads at 1 and 2 minutes (0.41 vs 0.37), ours at 4 (0.37 vs 0.33)
    assert verdicts["ours at or above TRL's mean at every time point"].endswith("NOT met (behind at 1, 2 min)")


def test_targets_flag_a_selected_step_more_than_one_problem_below_the_last():
    runs = {"ours": {0: curve((0, 0, 0.30), (5, 30, 0.35), (30, 230, 0.40), selected=5, problems=100)}}
    line = targets(runs, [4], 240)[0]
    assert line.startswith("selected never below last by more than one problem, above it on the mean: NOT met")
    assert "worst seed -5 problems" in line


def test_paired_differences_use_only_the_seeds_both_ran():
    base = {0: curve((0, 0, 0.3), (5, 30, 0.4)), 1: curve((0, 0, 0.3), (5, 30, 0.5))}
    knob = {1: curve((0, 0, 0.3), (5, 30, 0.6)), 2: curve((0, 0, 0.3), (5, 30, 0.9))}
    (line,) = paired({"defaults": base, "knob": knob}, [1], 60)
    assert line.startswith("knob minus defaults, 1 paired seeds: 1 min 0.100 ± 0.000")


def test_per_seed_names_the_selected_and_the_last_step():
    text = per_seed({"ours": {3: curve((0, 0, 0.25), (7, 40, 0.5), (9, 90, 0.375), selected=7)}})
    assert "| ours | 3 | 0.250 / 0.250 | 0.500 / 0.500 (7) | 0.375 / 0.375 (9) |" in text


def test_selection_rules_replay_the_trainers_rule_on_validation_and_read_test():
    # validation (33 problems): 0.82 at step 10, 0.79 at 20 (one problem under: within 1 standard
    # error, 0.067), 0.70 at 30; test: 0.60, 0.56, 0.50 on 100 problems
    points = curve((0, 0, 0.3), (10, 60, 0.60), (20, 120, 0.56), (30, 180, 0.50), problems=100)
    for p, val in zip(points[1:], [27 / 33, 26 / 33, 23 / 33], strict=True):
        p.update(val_accuracy=val, val_lenient_accuracy=val, val_problems=33)
    points.append({**points[2], "selected": True})  # the trainer's pick, as learning_run.py adds it
    points[-1] = {k: v for k, v in points[-1].items() if not k.startswith("val_")}
    lines = {line.split(":")[0]: line for line in selection_rules({0: points}, tolerances=(0.0, 1.0))}
    assert lines["select_tolerance 0"].endswith("+10.0 problems on the mean (per seed +10; steps 10)")
    assert lines["select_tolerance 1"].endswith("+6.0 problems on the mean (per seed +6; steps 20)")
    # runs without validation scores (TRL, or recorded before they were kept) give no lines
    assert selection_rules({0: curve((0, 0, 0.3), (10, 60, 0.6))}) == []


@pytest.mark.parametrize(
    ("vendor", "family", "flags", "expected"),
    [
        ("GenuineIntel", "6", "avx2 avx512_bf16 amx_bf16", "xeon-amx"),
        ("AuthenticAMD", "25", "avx2 avx512_bf16", "epyc-avx512-bf16"),
        ("AuthenticAMD", "26", "avx2 avx512_bf16", "epyc-zen5-avx512-bf16"),
        ("AuthenticAMD", "25", "avx2", "epyc-avx2"),
        ("AuthenticAMD", "23", "avx2", "epyc-zen2-avx2"),
    ],
)
def test_machine_slug_keeps_cpu_kinds_with_different_speeds_apart(vendor, family, flags, expected):
    # results are compared only within one folder, so two CPUs that train at different speeds need two
    assert slug({"vendor_id": vendor, "cpu family": family, "flags": flags}) == expected
