"""Answer extraction and rewards on tricky strings."""

from __future__ import annotations

import pytest

from pipelines.verifiers.math_answer import (
    answers_match,
    boxed_contents,
    extract_final_answer,
    last_number,
    parse_number,
    strict_answer,
)
from pipelines.verifiers.rewards import accuracy_reward, format_reward


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 42", "42"),
        ("first #### 1\nthen #### 2", "2"),  # the last marker wins
        ("#### 1,234", "1,234"),
        ("so the answer is \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{{nested}{braces}}", "{nested}{braces}"),
        ("\\boxed{unbalanced", None),
        ("<answer> 17 </answer>", "17"),
        ("<ANSWER>5</ANSWER> and <answer>6</answer>", "6"),
        ("####", None),
        ("just prose with 12 in it", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_boxed_contents_finds_all():
    assert boxed_contents("\\boxed{1} x \\boxed{a{b}c}") == ["1", "a{b}c"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42.0),
        ("-7", -7.0),
        ("$1,000", 1000.0),
        ("3.50", 3.5),
        ("12.", 12.0),
        ("1/4", 0.25),
        ("1/0", None),
        ("abc", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("9" * 100, None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_answers_match_tolerance_and_text():
    assert answers_match("72.0", "72")
    assert answers_match("1,234", "1234")
    assert not answers_match("72.1", "72")
    assert answers_match("Paris ", "paris")
    assert not answers_match(None, "1")


def test_strict_answer_requires_trailing_marker():
    assert strict_answer("3 * 4 = 12\n#### 12") == "12"
    assert strict_answer("#### 12.") == "12"
    assert strict_answer("#### 12 and then more words") is None
    assert strict_answer("12") is None


def test_last_number():
    assert last_number("I get 3, then 45.5 total") == "45.5"
    assert last_number("none here") is None


def test_rewards_follow_trl_contract():
    completions = ["2 + 2 = 4\n#### 4", "#### 5", "four"]
    answers = ["4", "#### 4", "4"]  # GSM8K-style answers keep the value after ####
    assert accuracy_reward(["p"] * 3, completions, answer=answers, id=["a", "b", "c"]) == [1.0, 0.0, 0.0]
    assert format_reward(["p"] * 3, completions) == [1.0, 1.0, 0.0]
    conversational = [[{"role": "assistant", "content": "#### 4"}]]
    assert accuracy_reward(["p"], conversational, answer=["4"]) == [1.0]


def test_unknown_reward_names_the_tasks_rewards_and_the_generic_ones():
    from pipelines.verifiers import catalog
    from pipelines.verifiers.math_task import TASK

    with pytest.raises(ValueError, match="math task has accuracy, format, and any task can add length, overlong"):
        catalog.reward_function(TASK, "nope")


# ---- Numbers that are wrong must not score as correct (issue "Hardening", item 6) ----


@pytest.mark.parametrize(
    ("predicted", "expected", "match"),
    [
        ("123456800", "123456789", False),  # rel_tol 1e-6 used to accept these
        ("1000001", "1000000", False),
        ("1000000.5", "1000000", False),  # a fractional part does not open a wide tolerance
        ("42.0", "42", True),  # integer-valued decimals equal the integer
        ("84/2", "42", True),
        ("$1,000,000", "1000000", True),
        ("0.5", "1/2", True),  # exact rationals
        ("0.3333333", "1/3", True),  # a rounded decimal: within half its last place and 1e-6 relative
        ("0.33", "1/3", False),
        ("2.5", "2.54", False),
        ("0.30000000000000004", "0.3", True),
        ("4_2", "42", False),  # float() reads 4_2 as 42
        ("٤٢", "42", False),  # Arabic-Indic digits
        ("４２", "42", False),  # fullwidth digits
        ("𝟒𝟐", "42", False),  # mathematical bold digits
        ("1e400", "1e400", True),  # not a number (beyond float), but the same text
    ],
)
def test_numbers_match_exactly_unless_a_decimal_was_rounded(predicted, expected, match):
    assert answers_match(predicted, expected) is match
    assert answers_match(expected, predicted) is match


@pytest.mark.parametrize("text", ["4_2", "٤٢", "４２", "𝟒𝟐", "1_000", "١/٢", "nan", "inf", "1e9999"])
def test_only_ascii_digits_without_underscores_are_numbers(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("digits", ["٤٢", "４２", "𝟒𝟐"])
def test_other_scripts_digits_are_not_answers(digits):
    assert strict_answer(f"so\n#### {digits}") is None
    assert last_number(f"the answer is {digits}") is None
    assert accuracy_reward(["q"], [f"#### {digits}"], answer=["42"]) == [0.0]
    assert format_reward(["q"], [f"#### {digits}"]) == [0.0]


def test_countdown_refuses_other_scripts_digits_and_underscores():
    from pipelines.verifiers.countdown import countdown_target, solves
    from pipelines.verifiers.rewards import countdown_reward

    assert solves("3 + 4", [3, 4], 7)
    for expression in ["٣ + ٤", "３ + ４", "𝟑 + 𝟒", "3 + 4_0"]:
        assert not solves(expression, [3, 4, 40], 7) and not solves(expression, [3, 4, 40], 43)
    assert countdown_target("٧") is None and countdown_target("7") == 7
    assert countdown_reward(["q"], ["#### ٣ + ٤"], numbers=[[3, 4]], answer=["7"]) == [0.0]


def test_only_the_tail_is_read_and_trailing_whitespace_is_free():
    from pipelines.verifiers.math_answer import TAIL_CHARS

    assert strict_answer("#### 7" + " " * 1_000_000) == "7"
    assert extract_final_answer("\\boxed{7}" + "\n" * 1_000_000) == "7"
    assert last_number("1 " + "x" * TAIL_CHARS) is None  # beyond the tail
    assert extract_final_answer("#### 5\n" + "x" * (TAIL_CHARS - 30) + "\\boxed{6}") == "5"  # `####` wins
    assert extract_final_answer("#### 5\n" + "x" * TAIL_CHARS + "\\boxed{6}") == "6"  # `####` is beyond the tail


def test_strict_answer_reads_sign_dollar_and_final_dot_as_before():
    assert strict_answer("#### -12") == "-12"
    assert strict_answer("####\n$ 1,234.50 .") == "$ 1,234.50"
    assert strict_answer("#####12") == "12"
    assert strict_answer("#### $-12") is None  # the sign comes first
    assert strict_answer("#### 12..") is None
    assert strict_answer("#### 1.5.5") is None
