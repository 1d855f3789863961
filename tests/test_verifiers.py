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
from pipelines.verifiers.rewards import accuracy_reward, format_reward, get_reward


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


def test_unknown_reward_names_choices():
    with pytest.raises(ValueError, match="accuracy"):
        get_reward("nope")
