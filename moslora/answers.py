"""Final-answer extraction and comparison for math word problems.

Generations are scored as in LLM-Adapters: the number after an explicit final-answer phrase,
else the last number in the text, compared with the numeric gold answer within a tolerance.
"""

from __future__ import annotations

import math
import re

FINAL_ANSWER_TEMPLATE = "The answer is {}."

# One number token. The alternatives are tried in order, so the longer forms (a LaTeX fraction,
# a mixed number, a simple fraction, a number with thousands separators) win over a plain
# number. A minus sign counts only when it does not follow a word character or a closing
# bracket, because there it is the subtraction operator ("5-3=2").
_NUMBER = re.compile(
    r"""
    (?:(?<![\w)\]}])(?P<sign>-)\$?)?
    (?:
        \\[dt]?frac\{\s*(?P<latex_num>\d+(?:\.\d+)?)\s*\}\{\s*(?P<latex_den>\d+(?:\.\d+)?)\s*\}
      | (?P<whole>\d+)\ (?P<mixed_num>\d+)/(?P<mixed_den>\d+)(?![\d/]|\.\d)
      | (?P<frac_num>\d+)/(?P<frac_den>\d+)(?![\d/]|\.\d)
      | (?P<grouped>\d{1,3}(?:,\d{3})+(?!,?\d)(?:\.\d+)?)
      | (?P<plain>\d+(?:\.\d+)?)
      | (?<![\w.])(?P<bare_decimal>\.\d+)
    )
    """,
    re.VERBOSE,
)

_SCIENTIFIC = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")

# Phrases that introduce the final answer, matched case-insensitively.
_ANSWER_PHRASE = re.compile(r"\banswer\s+is\b|\banswer\s*:|####|\\boxed\s*\{", re.IGNORECASE)

# The end of the sentence that follows an answer phrase: a period followed by whitespace or the
# end of the text (so a decimal point does not end it), or a newline.
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")


def format_number(x: float) -> str:
    """Format a number as an answer: integers without ".0", others with at most 4 decimals.

    Raises ValueError for NaN and infinities.
    """
    if not math.isfinite(x):
        raise ValueError(f"cannot format the non-finite number {x!r} as an answer")
    rounded = round(float(x), 4)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.4f}".rstrip("0").rstrip(".")


def _fraction(numerator: str, denominator: str) -> list[float]:
    """Return the value of a fraction, or its two parts when the denominator is zero."""
    if float(denominator) == 0:
        return [float(numerator), float(denominator)]
    return [float(numerator) / float(denominator)]


def _match_values(match: re.Match[str]) -> list[float]:
    """Return the values that one number token stands for (usually one, at most two)."""
    groups = match.groupdict()
    if groups["latex_num"] is not None:
        values = _fraction(groups["latex_num"], groups["latex_den"])
    elif groups["whole"] is not None:
        whole = float(groups["whole"])
        numerator, denominator = float(groups["mixed_num"]), float(groups["mixed_den"])
        if 0 < numerator < denominator:
            values = [whole + numerator / denominator]
        else:
            # Not a proper mixed number such as "2 1/2", so read "3 10/2" as 3 then 10/2.
            values = [whole, *_fraction(groups["mixed_num"], groups["mixed_den"])]
    elif groups["frac_num"] is not None:
        values = _fraction(groups["frac_num"], groups["frac_den"])
    elif groups["grouped"] is not None:
        values = [float(groups["grouped"].replace(",", ""))]
    elif groups["plain"] is not None:
        values = [float(groups["plain"])]
    else:
        values = [float(groups["bare_decimal"])]
    if groups["sign"]:
        values[0] = -values[0]
    return values


def _numbers(text: str) -> list[float]:
    """Return every number in the text, in order."""
    values: list[float] = []
    for match in _NUMBER.finditer(text):
        values.extend(_match_values(match))
    return values


def _normalize_text(text: str) -> str:
    """Replace the Unicode minus sign with "-" so that negative answers parse."""
    return text.replace("\u2212", "-")


def parse_number(text: str) -> float | None:
    """Parse one numeric string such as "1,000", "-5", "$1,200.50", "3/4", "50%" or "12 apples".

    A number may carry a leading "$" or "+", a trailing "%", period or unit word, and may be a
    simple or mixed fraction or a LaTeX ``\\frac{a}{b}``. Returns None when the text does not
    start with a number or contains a second number.
    """
    stripped = _normalize_text(text).strip()
    if _SCIENTIFIC.fullmatch(stripped):
        value = float(stripped)
        return value if math.isfinite(value) else None
    stripped = stripped.removeprefix("+").removeprefix("$")
    match = _NUMBER.match(stripped)
    if match is None:
        return None
    values = _match_values(match)
    rest = stripped[match.end() :]
    if len(values) != 1 or re.search(r"\d", rest):
        return None
    if rest and not re.match(r"\s|[%.,;:!?)]|[^\W\d_]", rest):
        return None
    return values[0]


def _boxed_content(text: str, start: int) -> str:
    """Return the text inside the braces that open just before ``start``, nested braces kept."""
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return text[start:]


def _sentence_after(text: str, phrase: re.Match[str]) -> str:
    """Return the text that an answer phrase introduces: its sentence, or a ``\\boxed{}`` body."""
    if phrase.group().endswith("{"):
        return _boxed_content(text, phrase.end())
    rest = text[phrase.end() :]
    end = _SENTENCE_END.search(rest)
    return rest if end is None else rest[: end.start()]


def extract_answer(text: str) -> float | None:
    """Extract the final numeric answer of a generation.

    The first final-answer phrase ("the answer is", "answer:", "####" or ``\\boxed{...}``) that
    is followed by a number wins, and the answer is the last number of the sentence after it,
    so "The answer is 5 + 3 = 8." gives 8. Without such a phrase, the answer is the last number
    in the text. Returns None when the text contains no number.
    """
    text = _normalize_text(text)
    for phrase in _ANSWER_PHRASE.finditer(text):
        values = _numbers(_sentence_after(text, phrase))
        if values:
            return values[-1]
    values = _numbers(text)
    return values[-1] if values else None


def is_correct(predicted: float | None, gold: float, tolerance: float = 1e-3) -> bool:
    """Return whether a predicted answer is within ``tolerance`` (absolute) of the gold answer.

    A missing or non-finite prediction is wrong, and so is any prediction for a non-finite gold.
    """
    if predicted is None:
        return False
    if not (math.isfinite(predicted) and math.isfinite(gold)):
        return False
    return abs(predicted - gold) <= tolerance
