"""Tests for final-answer extraction, number parsing and formatting."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moslora.answers import (
    FINAL_ANSWER_TEMPLATE,
    extract_answer,
    format_number,
    is_correct,
    parse_number,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2.0, "2"),
        (-15.0, "-15"),
        (0.0, "0"),
        (-0.0, "0"),
        (-0.00001, "0"),
        (1.8333333333333335, "1.8333"),
        (0.75, "0.75"),
        (0.1 + 0.2, "0.3"),
        (2.99999, "3"),
        (-2.5, "-2.5"),
        (1000000.0, "1000000"),
        (117094.56, "117094.56"),
        (1e20, "100000000000000000000"),
        (0.16666666666666666, "0.1667"),
        (7, "7"),
    ],
)
def test_format_number(value, expected):
    assert format_number(value) == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_number_rejects_non_finite(value):
    with pytest.raises(ValueError, match="non-finite"):
        format_number(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", 7.0),
        ("  7  ", 7.0),
        ("1,000", 1000.0),
        ("1,000,000", 1000000.0),
        ("-5", -5.0),
        ("+7", 7.0),
        ("3.5", 3.5),
        (".5", 0.5),
        ("$1,200.50", 1200.5),
        ("-$5", -5.0),
        ("3/4", 0.75),
        ("2 1/2", 2.5),
        ("50%", 50.0),
        ("50 %", 50.0),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{8}", 0.125),
        ("-\\frac{1}{2}", -0.5),
        ("12 apples", 12.0),
        ("4.", 4.0),
        ("1e-05", 1e-05),
        ("\u22127", -7.0),
        ("576.0", 576.0),
        ("1.8333333333333335", 1.8333333333333335),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "abc", "3,4", "12 13", "nan", "inf", "five", "= 5", "5-3", "(A)"]
)
def test_parse_number_rejects(text):
    assert parse_number(text) is None


EXTRACTION_CASES = [
    # Explicit final-answer phrases.
    ("The answer is 8.", 8.0),
    ("The answer is 5 + 3 = 8.", 8.0),
    ("the answer is 42", 42.0),
    ("THE ANSWER IS 12.", 12.0),
    ("Answer: 17", 17.0),
    ("Final answer: 3.5 liters", 3.5),
    ("The answer is: 9", 9.0),
    ("She has 5 left.\n#### 5", 5.0),
    ("#### 1,080", 1080.0),
    ("So the total is \\boxed{24}.", 24.0),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("The answer is \\boxed{-3}. Then 8", -3.0),
    # The first phrase wins, and text after its sentence is ignored.
    ("The answer is 8.\nQuestion: Tom has 7 apples.", 8.0),
    ("The answer is 8.\n\nThe answer is 9.", 8.0),
    ("The answer is 3.5 apples. Then 9 more", 3.5),
    ("The answer is 12\nIn the next problem there are 40 cows", 12.0),
    ("The answer is 4. 5 is wrong", 4.0),
    # A phrase that is not followed by a number falls through to the next one.
    ("The answer is below.\nThe answer is 7.", 7.0),
    ("The answer is simple. 3 + 4 = 7", 7.0),
    # No phrase: the last number in the text.
    ("48 / 2 = 24 clips in May. 48 + 24 = 72 clips", 72.0),
    ("So 48/2 = 24", 24.0),
    ("There are 7 crayons and Mary took 3, so 7 - 3 = 4", 4.0),
    # Negative numbers versus subtraction.
    ("The answer is -7.", -7.0),
    ("x = -7", -7.0),
    ("He has 5-3=2 left", 2.0),
    ("The temperature fell to (-4) degrees", -4.0),
    ("The change is 10 - 13", 13.0),
    ("The answer is \u22125.", -5.0),
    # Thousands separators only in well-formed groups of three.
    ("The answer is 1,000,000.", 1000000.0),
    ("The answer is $1,200.50.", 1200.5),
    ("Pick 3,4", 4.0),
    ("The answer is 1,0000", 0.0),
    # Decimals, fractions, percentages and units.
    ("The answer is 0.75.", 0.75),
    ("The answer is .5 cups.", 0.5),
    ("The answer is 3/4.", 0.75),
    ("The answer is 2 1/2 cups.", 2.5),
    ("The answer is 3 10/2", 5.0),
    ("The answer is 50%.", 50.0),
    ("Answer: 12 apples.", 12.0),
    ("The answer is 4.", 4.0),
    ("The answer is 4.\n", 4.0),
    # Text shaped like real generations.
    (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in "
        "April and May.\nThe answer is 72.",
        72.0,
    ),
    (
        "A: Matthew gave equal numbers of crackers and cakes to his 4 friends. He had 32 "
        "crackers, so each friend got 32 / 4 = 8 crackers. The answer is 8.\n\n### Instruction:"
        "\nA farmer has 12 cows",
        8.0,
    ),
    (
        "((22 - 14) / 4) = 2.\nThe answer is 2.<|im_end|>\n<|im_start|>user\nNext: 30 apples",
        2.0,
    ),
    ("The discount is 60/100 * 5 = $3.\nSo in total she pays 24 + 40 = $64.", 64.0),
    ("He needs 3 - 1.1667 = 1.8333 more inches", 1.8333),
    ("So the final answer is 18 dollars because 16 - 3 - 4 = 9 and 9 * 2 = 18.", 18.0),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "No numbers here.", "The answer is unknown.", "Answer: (A)"])
def test_extract_answer_without_number(text):
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        (8.0, 8.0, True),
        (1.8333, 1.8333333333333335, True),
        (8.0009, 8.0, True),
        (8.002, 8.0, False),
        (-7.0, 7.0, False),
        (None, 8.0, False),
        (math.nan, 8.0, False),
        (math.inf, math.inf, False),
        (8.0, math.nan, False),
    ],
)
def test_is_correct(predicted, gold, expected):
    assert is_correct(predicted, gold) is expected


def test_is_correct_custom_tolerance():
    assert is_correct(8.4, 8.0, tolerance=0.5)
    assert not is_correct(8.6, 8.0, tolerance=0.5)


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_template_round_trip_property(value):
    sentence = FINAL_ANSWER_TEMPLATE.format(format_number(value))
    assert is_correct(extract_answer(sentence), value)


def _gold_answers(path):
    return [float(row.get("ans", row.get("answer"))) for row in json.loads(path.read_text())]


@pytest.mark.parametrize("relative_path", ["mawps/test.json", "svamp/test.json"])
def test_template_round_trip_on_real_answers(data_dir, relative_path):
    golds = _gold_answers(data_dir / relative_path)
    assert golds
    wrong = [
        gold
        for gold in golds
        if not is_correct(extract_answer(FINAL_ANSWER_TEMPLATE.format(format_number(gold))), gold)
    ]
    assert wrong == []
