"""Answer extraction and comparison for AQuA multiple-choice and MATH LaTeX problems.

AQuA generations are scored by the letter (A-E) they choose, with a numeric fallback against
the choice texts. MATH generations are scored by the content of their last ``\\boxed{...}``,
compared with the LaTeX gold answer after string normalisation and, failing that, by
converting both to sympy (a small LaTeX subset parsed here, because sympy.parsing.latex needs
the antlr4 package) and comparing their values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from moslora.answers import extract_answer, parse_number

# ----------------------------------------------------------------------------------------------
# AQuA: multiple choice
# ----------------------------------------------------------------------------------------------

CHOICE_LETTERS = "ABCDE"

_CHOICES_HEADER = re.compile(r"answer\s+choices\s*:?", re.IGNORECASE)

# "(C)" as a choice marker. A word character before the bracket makes it a function argument
# or a probability ("f(A)", "P(A)"), so that does not count.
_PAREN_LETTER = re.compile(r"(?<!\w)\(\s*([A-E])\s*\)")

# "C)" at the start of a line or after whitespace, as in "C) 79".
_CLOSE_PAREN_LETTER = re.compile(r"(?<!\S)([A-E])\)")

# A letter after "answer", "option" or "choice", with optional linking words and brackets:
# "The answer is (C)", "answer: C", "option c", "the correct choice is **B**". The letter must
# be followed by whitespace, punctuation or the end, so "answer is e^2" is not E.
_KEYWORD_LETTER = re.compile(
    r"\b(?:answer|option|choice)\b"
    r"(?:\s*(?:is|would\s+be|will\s+be|should\s+be|must\s+be|[:=])){0,2}"
    r"(?:\s*(?:option|choice)\b)?"
    r"\s*[*(\[{]*\s*(?P<letter>[A-Ea-e])(?=[\s.,;:!?)\]}*]|\Z)",
    re.IGNORECASE,
)

# After "answer is A", these words show that "A" names a choice ("A because ...") rather than
# being an article ("A train ...").
_WORDS_AFTER_CHOICE = frozenset(
    "is was because since as and or which with would will should must seems appears "
    "correct right fits matches so hence therefore thus then".split()
)
_FOLLOWING_WORD = re.compile(r"\s+([a-z]+)")

# A capital letter standing alone as the last token, as in "... so the answer is B."
_FINAL_LETTER = re.compile(r"(?<![\w'\\])([A-E])[\s.!*)\]}$]*\Z")

_BOXED_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")

# A currency word before a choice value ("Rs. 697.50"), which parse_number does not accept.
_CURRENCY_PREFIX = re.compile(r"^(?:rs\.?|inr|usd|\$|£|€)\s*", re.IGNORECASE)

CHOICE_TOLERANCE = 1e-3


def parse_choices(question: str) -> dict[str, str]:
    """Parse the choice texts of an AQuA question, keyed by letter.

    The choices follow the last "Answer Choices:" as "(A) ... (B) ... (E) ...". Without that
    header the whole question is searched. Markers must appear in the order A, B, C, D, E, so
    "(D-3)" inside a choice text is not a marker. A choice text that repeats its own letter
    ("(A) A) 59") is stripped of the copy. Returns fewer than five entries when markers are
    missing.
    """
    headers = list(_CHOICES_HEADER.finditer(question))
    tail = question[headers[-1].end() :] if headers else question
    markers: list[re.Match[str]] = []
    for marker in re.finditer(r"\(([A-E])\)", tail):
        if len(markers) < len(CHOICE_LETTERS) and marker.group(1) == CHOICE_LETTERS[len(markers)]:
            markers.append(marker)
    choices: dict[str, str] = {}
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(tail)
        letter = marker.group(1)
        text = tail[marker.end() : end].strip()
        choices[letter] = re.sub(rf"^{letter}\)\s*", "", text)
    return choices


def _blank_echoed_choices(text: str) -> str:
    """Blank the (A)...(E) markers of an "Answer Choices:" list copied into a generation.

    Without this, a generation that repeats the question's choice list would choose (E). A
    list counts only when all five markers follow the header in order, so that an answer
    "(C)" after a partial copy is kept.
    """
    characters = list(text)
    for header in _CHOICES_HEADER.finditer(text):
        markers: list[re.Match[str]] = []
        for marker in re.finditer(r"\(([A-E])\)", text[header.end() :]):
            if marker.group(1) == CHOICE_LETTERS[len(markers)]:
                markers.append(marker)
                if len(markers) == len(CHOICE_LETTERS):
                    break
        if len(markers) < len(CHOICE_LETTERS):
            continue
        for marker in markers:
            start = header.end() + marker.start()
            characters[start : start + len(marker.group())] = " " * len(marker.group())
    return "".join(characters)


def _is_article(text: str, letter_end: int) -> bool:
    """Return whether the "A" or "a" ending at ``letter_end`` reads as an article."""
    following = _FOLLOWING_WORD.match(text, letter_end)
    return following is not None and following.group(1) not in _WORDS_AFTER_CHOICE


def _boxed_letter(content: str) -> str | None:
    """Return the choice letter that a ``\\boxed{}`` body names ("C", "(c)", "\\text{C}")."""
    cleaned = _TEXT_WRAPPER.sub(r"\1", content)
    cleaned = cleaned.strip().strip("$*").strip().rstrip(".").strip("()").strip()
    return cleaned.upper() if re.fullmatch(r"[A-Ea-e]", cleaned) else None


def _letter_candidates(text: str) -> list[tuple[int, str]]:
    """Return every explicit choice letter in the text with its position."""
    candidates: list[tuple[int, str]] = []
    for pattern in (_PAREN_LETTER, _CLOSE_PAREN_LETTER, _FINAL_LETTER):
        for match in pattern.finditer(text):
            candidates.append((match.start(1), match.group(1)))
    for match in _KEYWORD_LETTER.finditer(text):
        letter = match.group("letter")
        if letter in "Aa" and _is_article(text, match.end("letter")):
            continue
        candidates.append((match.start("letter"), letter.upper()))
    for match in _BOXED_START.finditer(text):
        group = _braced_group(text, match.end() - 1)
        letter = None if group is None else _boxed_letter(group[0])
        if letter is not None:
            candidates.append((match.start(), letter))
    return candidates


def _choice_value(choice: str) -> float | None:
    """Return the numeric value of a choice text, or None when it is not a single number."""
    return parse_number(_CURRENCY_PREFIX.sub("", choice.strip()))


def _choice_by_value(text: str, choices: dict[str, str]) -> str | None:
    """Return the only choice whose value matches the last number of the text."""
    value = extract_answer(text)
    if value is None:
        return None
    matching = []
    for letter, choice in choices.items():
        choice_value = _choice_value(choice)
        if choice_value is not None and abs(choice_value - value) <= CHOICE_TOLERANCE:
            matching.append(letter)
    return matching[0] if len(matching) == 1 else None


def extract_choice(text: str, choices: dict[str, str] | None = None) -> str | None:
    """Extract the choice letter (A-E) that a generation picks.

    The last explicit choice wins: "(C)", "C)", "answer: C", "the answer is c", "option C",
    "choice c", ``\\boxed{C}``, or a capital letter standing alone as the final token. Letters
    inside words and an article "A" ("A train leaves ...") do not count, and neither do the
    markers of an "Answer Choices:" list copied from the question. Without a letter and with
    ``choices`` given, the last number of the text (as moslora.answers.extract_answer reads
    it) selects the choice whose value is within 1e-3 of it. Returns None when no letter is
    found and no single choice matches, so a value shared by two choices gives None.
    """
    candidates = _letter_candidates(_blank_echoed_choices(text))
    if candidates:
        return max(candidates)[1]
    if choices:
        return _choice_by_value(text, choices)
    return None


# ----------------------------------------------------------------------------------------------
# MATH: LaTeX answers
# ----------------------------------------------------------------------------------------------

_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS = re.compile(r"\banswer\s+is\b:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")

# Inputs longer than this skip the sympy check, which has no timeout.
MAX_SYMBOLIC_LENGTH = 200
RELATIVE_TOLERANCE = 1e-6


def _braced_group(text: str, open_index: int) -> tuple[str, int] | None:
    """Return the content of the brace group opening at ``open_index`` and the index after it.

    Escaped braces ``\\{`` and ``\\}`` do not count. Returns None when the group is unbalanced.
    """
    depth = 0
    index = open_index
    while index < len(text):
        character = text[index]
        if character == "\\":
            index += 2
            continue
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index], index + 1
        index += 1
    return None


def last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in the text.

    Nested braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. The form
    ``\\boxed 5`` without braces gives the text up to the next whitespace or "$". Returns None
    when there is no box or the last one is unbalanced or empty of an argument.
    """
    commands = list(_BOXED_COMMAND.finditer(text))
    if not commands:
        return None
    index = commands[-1].end()
    while index < len(text) and text[index].isspace():
        index += 1
    if index < len(text) and text[index] == "{":
        group = _braced_group(text, index)
        return None if group is None else group[0]
    argument = re.match(r"[^\s$]+", text[index:])
    return None if argument is None else argument.group()


def extract_latex_answer(text: str) -> str | None:
    """Extract the LaTeX final answer of a generation.

    The answer is the last ``\\boxed{}`` content, else the rest of the sentence after the last
    "answer is" ("The final answer is $\\frac{1}{2}$."). Returns None when neither is present
    or the sentence is empty.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_IS.finditer(text))
    if not phrases:
        return None
    rest = text[phrases[-1].end() :]
    end = _SENTENCE_END.search(rest)
    sentence = (rest if end is None else rest[: end.start()]).strip()
    return sentence or None


# ----------------------------------------------------------------------------------------------
# LaTeX normalisation
# ----------------------------------------------------------------------------------------------

_SPACING_COMMANDS = re.compile(r"(?<!\\)\\[!,;:> ]|~|\\q?quad(?![A-Za-z])")
_SIZING_COMMANDS = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg|displaystyle)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])")
_UNIT_TEXT = re.compile(
    r"\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z\s./]*\}(?:\s*\^\s*\{?\d\}?)?\s*$"
)
_PLAIN_UNIT = re.compile(r"^(-?[\d.,]+)\s+[A-Za-z]{2,}(?:\^\d)?$")
_VARIABLE_PREFIX = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)\s*(?:=|\\in(?![A-Za-z]))\s*")
_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MISSING_LEADING_ZERO = re.compile(r"(?<![\d.\\])\.(?=\d)")
_SINGLE_CHARACTER_SCRIPT = re.compile(r"([\^_])\{(\w)\}")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _strip_math_delimiters(text: str) -> str:
    """Remove one pair of surrounding math delimiters such as ``$...$`` or ``\\(...\\)``."""
    for opening, closing in _MATH_DELIMITERS:
        if len(text) >= len(opening) + len(closing) and text.startswith(opening):
            if text.endswith(closing):
                return text[len(opening) : -len(closing)].strip()
    return text


def _remove_spaces(text: str) -> str:
    """Remove whitespace, except one space between a command and a letter ("\\cot x")."""

    def replace(space: re.Match[str]) -> str:
        after_command = re.search(r"\\[A-Za-z]+$", text[: space.start()]) is not None
        before_letter = text[space.end() : space.end() + 1].isalpha()
        return " " if after_command and before_letter else ""

    return re.sub(r"\s+", replace, text)


def _read_argument(text: str, index: int) -> tuple[str, int] | None:
    """Read one macro argument at ``index``: a brace group, a command or a single character.

    Returns the argument without braces and the index after it, or None when it is missing.
    """
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text):
        return None
    if text[index] == "{":
        return _braced_group(text, index)
    if text[index] == "\\":
        command = re.match(r"\\(?:[A-Za-z]+|.)", text[index:], re.DOTALL)
        if command is None:
            return None
        return command.group(), index + len(command.group())
    if text[index] in "}^_":
        return None
    return text[index], index + 1


def _brace_arguments(text: str) -> str:
    """Rewrite ``\\frac12`` as ``\\frac{1}{2}`` and ``\\sqrt2`` as ``\\sqrt{2}``, recursively.

    A command whose arguments are missing is left as it is.
    """
    pieces: list[str] = []
    index = 0
    for command in re.finditer(r"\\(frac|sqrt)(?![A-Za-z])", text):
        if command.start() < index:
            continue
        pieces.append(text[index : command.start()])
        position = command.end()
        prefix = "\\" + command.group(1)
        if command.group(1) == "sqrt":
            degree = re.match(r"\s*\[([^\[\]]*)\]", text[position:])
            if degree is not None:
                prefix += f"[{degree.group(1)}]"
                position += degree.end()
        arguments = []
        for _ in range(2 if command.group(1) == "frac" else 1):
            argument = _read_argument(text, position)
            if argument is None:
                break
            arguments.append("{" + _brace_arguments(argument[0]) + "}")
            position = argument[1]
        if len(arguments) == (2 if command.group(1) == "frac" else 1):
            pieces.append(prefix + "".join(arguments))
            index = position
        else:
            pieces.append(command.group())
            index = command.end()
    pieces.append(text[index:])
    return "".join(pieces)


def normalize_latex(answer: str) -> str:
    """Normalise a LaTeX answer so that equal answers written differently compare equal.

    The steps remove math delimiters, ``\\left``/``\\right``, spacing commands (``\\!``,
    ``\\,``, ``\\;``), degrees (``^\\circ``, ``°``), percent and dollar signs, a unit in
    ``\\text{}`` or a unit word after a number, a trailing period and a single-variable prefix
    ("x =", "y=", "x \\in"). They turn ``\\dfrac``/``\\tfrac`` into ``\\frac`` and brace the
    arguments of ``\\frac12`` and ``\\sqrt2``. A text-only answer is unwrapped
    (``\\text{Evelyn}`` to "Evelyn") and "(B)" becomes "B". A plain number loses its thousands
    separators and ".5" becomes "0.5". Finally, braces around a one-character exponent or
    subscript go, and so does whitespace, except between a command and a letter.
    """
    text = _strip_math_delimiters(answer.strip())
    text = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", text)
    text = _SIZING_COMMANDS.sub("", text)
    text = _SPACING_COMMANDS.sub(" ", text)
    text = _DEGREES.sub("", text)
    text = text.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    unit = _UNIT_TEXT.search(text)
    if unit is not None and text[: unit.start()].strip():
        text = text[: unit.start()]
    text = _TEXT_WRAPPER.sub(r"\1", text).strip()
    text = _PLAIN_UNIT.sub(r"\1", text)
    text = text.rstrip(".").strip()
    prefix = _VARIABLE_PREFIX.match(text)
    if prefix is not None and "=" not in text[prefix.end() :] and text[prefix.end() :].strip():
        text = text[prefix.end() :]
    text = _brace_arguments(text)
    text = _remove_spaces(text)
    if _GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    text = _MISSING_LEADING_ZERO.sub("0.", text)
    text = _SINGLE_CHARACTER_SCRIPT.sub(r"\1\2", text)
    letter = re.fullmatch(r"\(([A-Z])\)", text)
    return letter.group(1) if letter is not None else text


# ----------------------------------------------------------------------------------------------
# LaTeX to sympy, for a small subset of LaTeX
# ----------------------------------------------------------------------------------------------


class _UnsupportedLatex(ValueError):
    """Raised when an answer uses LaTeX outside the subset that the converter reads."""


_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d+(?:\.\d*)?|\.\d+)|(?P<command>\\[A-Za-z]+)|(?P<letters>[A-Za-z]+)"
    r"|(?P<symbol>[-+*/^(){}\[\]!]))"
)

_CONSTANTS = {"\\pi": sympy.pi, "\\infty": sympy.oo}
_FUNCTIONS: dict[str, Callable[[sympy.Expr], sympy.Expr]] = {
    "\\sin": sympy.sin,
    "\\cos": sympy.cos,
    "\\tan": sympy.tan,
    "\\cot": sympy.cot,
    "\\sec": sympy.sec,
    "\\csc": sympy.csc,
    "\\arcsin": sympy.asin,
    "\\arccos": sympy.acos,
    "\\arctan": sympy.atan,
    "\\ln": sympy.log,
    "\\log": sympy.log,
    "\\exp": sympy.exp,
}
_PRODUCT_COMMANDS = frozenset({"\\cdot", "\\times"})

# Limits that keep sympy from building huge numbers: |exponent| of a power, the bit length of
# an exact power's result, and the argument of a factorial.
_MAX_EXPONENT = 1000
_MAX_POWER_BITS = 100_000
_MAX_FACTORIAL = 1000

# Values given to the variables of an answer when comparing it numerically, one tuple per
# sample point and one value per variable in name order (reused past the third variable).
# They are irrational-looking so that factors such as (x - 1) do not vanish by chance.
_SAMPLE_POINTS = (
    tuple(sympy.Float(value) for value in ("0.7381", "1.3119", "2.0547")),
    tuple(sympy.Float(value) for value in ("1.6243", "0.4172", "2.9931")),
    tuple(sympy.Float(value) for value in ("2.4417", "3.1783", "0.5873")),
)
_EVALUATION_DIGITS = 30

# A whole answer "137\frac{1}{2}" is the mixed number 137 + 1/2, not a product.
_MIXED_NUMBER = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")


def _tokenize(text: str) -> list[tuple[str, str]]:
    """Split LaTeX into (kind, text) tokens, raising _UnsupportedLatex on anything else."""
    tokens: list[tuple[str, str]] = []
    index = 0
    while index < len(text):
        match = _TOKEN.match(text, index)
        if match is None:
            if text[index:].strip():
                raise _UnsupportedLatex(f"unsupported character {text[index]!r}")
            break
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        index = match.end()
    return tokens


def _checked_power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    """Return base**exponent, raising _UnsupportedLatex when the result would be huge."""
    if exponent.is_number:
        if not exponent.is_finite or abs(complex(exponent)) > _MAX_EXPONENT:
            raise _UnsupportedLatex(f"exponent {exponent} is too large")
        if base.is_Rational and exponent.is_Rational:
            bits = max(int(base.p).bit_length(), int(base.q).bit_length())
            if bits * abs(float(exponent)) > _MAX_POWER_BITS:
                raise _UnsupportedLatex(f"power {base}^{exponent} is too large")
    return sympy.Pow(base, exponent)


class _LatexParser:
    """Recursive-descent parser from the LaTeX subset to a sympy expression.

    Grammar: sums of products, where a product is explicit (``*``, ``\\cdot``, ``\\times``,
    ``/``, ``\\div``) or implicit (``2\\sqrt{3}``, ``2x``). Atoms are numbers (decimals stay
    exact rationals), single letters (``i`` is the imaginary unit), ``\\pi``, ``\\infty``,
    brackets, ``\\frac``, ``\\sqrt`` with an optional degree, and the common functions.
    """

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.position = 0

    def parse(self) -> sympy.Expr:
        expression = self._sum()
        if self.position != len(self.tokens):
            raise _UnsupportedLatex(f"unexpected token {self.tokens[self.position][1]!r}")
        return expression

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> tuple[str, str]:
        token = self._peek()
        if token is None or (expected is not None and token[1] != expected):
            raise _UnsupportedLatex(f"expected {expected or 'a token'}, found {token}")
        self.position += 1
        return token

    def _sum(self) -> sympy.Expr:
        total = self._product()
        while (token := self._peek()) is not None and token[1] in "+-":
            self._take()
            term = self._product()
            total = total + term if token[1] == "+" else total - term
        return total

    def _starts_atom(self, token: tuple[str, str] | None) -> bool:
        if token is None:
            return False
        kind, text = token
        if kind in ("number", "letters"):
            return True
        if kind == "command":
            return text not in _PRODUCT_COMMANDS and text != "\\div"
        return text in "({"

    def _product(self) -> sympy.Expr:
        result = self._signed()
        while True:
            token = self._peek()
            if token is not None and (token[1] in _PRODUCT_COMMANDS or token[1] == "*"):
                self._take()
                result = result * self._signed()
            elif token is not None and token[1] in ("/", "\\div"):
                self._take()
                result = result / self._signed()
            elif self._starts_atom(token):
                result = result * self._power()
            else:
                return result

    def _signed(self) -> sympy.Expr:
        token = self._peek()
        if token is not None and token[1] in "+-":
            self._take()
            value = self._signed()
            return -value if token[1] == "-" else value
        return self._power()

    def _power(self) -> sympy.Expr:
        base = self._postfix()
        if (token := self._peek()) is not None and token[1] == "^":
            self._take()
            return _checked_power(base, self._signed_atom())
        return base

    def _signed_atom(self) -> sympy.Expr:
        token = self._peek()
        if token is not None and token[1] in "+-":
            self._take()
            value = self._signed_atom()
            return -value if token[1] == "-" else value
        return self._postfix()

    def _postfix(self) -> sympy.Expr:
        value = self._atom()
        while (token := self._peek()) is not None and token[1] == "!":
            self._take()
            if value.is_number and not (value.is_Integer and 0 <= value <= _MAX_FACTORIAL):
                raise _UnsupportedLatex(f"factorial of {value} is not supported")
            value = sympy.factorial(value)
        return value

    def _group(self) -> sympy.Expr:
        self._take("{")
        value = self._sum()
        self._take("}")
        return value

    def _atom(self) -> sympy.Expr:
        kind, text = self._take()
        if kind == "number":
            # NOTE: a digit run after "^" is read whole, so "2^10" is 1024 as in plain text,
            # although LaTeX itself would set only the "1" as the exponent.
            return sympy.Rational(text)
        if kind == "letters":
            if len(text) != 1:
                # A run of letters is a word (unwrapped \text{}), not a product of variables.
                raise _UnsupportedLatex(f"word {text!r} is not an expression")
            return sympy.I if text == "i" else sympy.Symbol(text)
        if text == "(":
            value = self._sum()
            self._take(")")
            return value
        if text == "{":
            value = self._sum()
            self._take("}")
            return value
        if text in _CONSTANTS:
            return _CONSTANTS[text]
        if text == "\\frac":
            numerator = self._group()
            return numerator / self._group()
        if text == "\\sqrt":
            if (token := self._peek()) is not None and token[1] == "[":
                self._take()
                degree = self._sum()
                self._take("]")
                return sympy.root(self._group(), degree)
            return sympy.sqrt(self._group())
        if text in _FUNCTIONS:
            return _FUNCTIONS[text](self._power())
        raise _UnsupportedLatex(f"unsupported token {text!r}")


def _to_sympy(text: str) -> sympy.Expr:
    """Convert one LaTeX expression of the supported subset to sympy."""
    mixed = _MIXED_NUMBER.fullmatch(text)
    if mixed is not None:
        sign, whole, numerator, denominator = mixed.groups()
        value = sympy.Integer(whole) + sympy.Rational(int(numerator), int(denominator))
        return -value if sign else value
    return _LatexParser(text).parse()


# ----------------------------------------------------------------------------------------------
# Answer structures: expressions, tuples, intervals, sets, matrices, equations
# ----------------------------------------------------------------------------------------------

_OPENERS = "([{"
_CLOSERS = ")]}"


@dataclass(frozen=True)
class _Answer:
    """A parsed answer: its kind, the bracket pair of a tuple or interval, and its parts.

    Kinds: "expression" (one part), "equation" (one part, left side minus right side),
    "tuple" (ordered, with ``brackets`` such as "(]"), "list" and "set" (unordered), "union"
    (ordered _Answer parts) and "matrix" (one tuple of parts per row).
    """

    kind: str
    parts: tuple
    brackets: str = ""


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside brackets, where "(3,4]" counts as one bracket pair.

    Escaped braces ``\\{`` and ``\\}`` count as brackets, so a set stays one piece.
    """
    pieces: list[str] = []
    depth = 0
    start = 0
    index = 0
    while index < len(text):
        if depth == 0 and text.startswith(separator, index):
            pieces.append(text[start:index])
            index += len(separator)
            start = index
            continue
        character = text[index]
        if character == "\\" and text[index + 1 : index + 2] in ("{", "}"):
            character = text[index + 1]
            index += 1
        if character in _OPENERS:
            depth += 1
        elif character in _CLOSERS:
            depth -= 1
        index += 1
    pieces.append(text[start:])
    return pieces


def _spans_whole(text: str) -> bool:
    """Return whether the bracket that opens the text closes at its last character."""
    depth = 0
    for index, character in enumerate(text):
        if character in _OPENERS:
            depth += 1
        elif character in _CLOSERS:
            depth -= 1
            if depth == 0:
                return index == len(text) - 1
    return False


def _parse_matrix(text: str) -> _Answer | None:
    """Parse ``\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}`` (or bmatrix) into rows."""
    match = re.fullmatch(r"\\begin\{([pb]?matrix)\}(.*)\\end\{\1\}", text, re.DOTALL)
    if match is None:
        return None
    rows = []
    for row in re.split(r"\\\\", match.group(2)):
        if row.strip():
            rows.append(tuple(_to_sympy(cell) for cell in row.split("&")))
    return _Answer("matrix", tuple(rows))


def _expand_plus_minus(items: list[str]) -> list[str]:
    """Replace each item "a \\pm b" by the two items "a+b" and "a-b"."""
    expanded: list[str] = []
    for item in items:
        sides = _split_top_level(item, "\\pm")
        if len(sides) > 2:
            raise _UnsupportedLatex(f"more than one \\pm in {item!r}")
        if len(sides) == 2:
            expanded.extend([f"{sides[0]}+{sides[1]}", f"{sides[0]}-{sides[1]}"])
        else:
            expanded.append(item)
    return expanded


def _parse_answer(text: str) -> _Answer:
    """Parse a normalised answer into its structure, raising _UnsupportedLatex when unreadable."""
    matrix = _parse_matrix(text)
    if matrix is not None:
        return matrix
    pieces = _split_top_level(text, "\\cup")
    if len(pieces) > 1:
        return _Answer("union", tuple(_parse_answer(piece) for piece in pieces))
    if text.startswith("\\{") and text.endswith("\\}"):
        items = _expand_plus_minus(_split_top_level(text[2:-2], ","))
        return _Answer("set", tuple(_to_sympy(item) for item in items))
    if text[:1] in "([" and text[-1:] in ")]" and _spans_whole(text):
        items = _split_top_level(text[1:-1], ",")
        if len(items) > 1:
            parts = tuple(_to_sympy(item) for item in items)
            return _Answer("tuple", parts, brackets=text[0] + text[-1])
    items = _expand_plus_minus(_split_top_level(text, ","))
    if len(items) > 1:
        return _Answer("list", tuple(_to_sympy(item) for item in items))
    sides = _split_top_level(text, "=")
    if len(sides) == 2:
        return _Answer("equation", (_to_sympy(sides[0]) - _to_sympy(sides[1]),))
    if len(sides) > 2:
        raise _UnsupportedLatex("a chain of equations is not supported")
    return _Answer("expression", (_to_sympy(text),))


def _values_close(first: sympy.Expr, second: sympy.Expr) -> bool:
    """Return whether two numbers differ by at most RELATIVE_TOLERANCE of the larger one."""
    difference = abs(first - second)
    return bool(difference <= RELATIVE_TOLERANCE * max(abs(first), abs(second)))


def _expressions_equal(first: sympy.Expr, second: sympy.Expr) -> bool:
    """Return whether two sympy expressions are equal, numerically at fixed sample points.

    Expressions with variables are evaluated at _SAMPLE_POINTS, and points where either side
    is not finite are skipped. NOTE: this replaces ``sympy.simplify(a - b) == 0``, which has
    no timeout and took over 3 seconds on some inputs under 100 characters (sympy 1.14). Agreement
    at three points can in principle accept two different expressions.
    """
    if first == second:
        return True
    infinite = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
    if first.has(*infinite) or second.has(*infinite):
        return False
    if first.is_Integer and second.is_Integer:
        # Two different integers are never close enough, however large they are.
        return False
    symbols = sorted(first.free_symbols | second.free_symbols, key=str)
    compared = 0
    for point in _SAMPLE_POINTS[: 1 if not symbols else len(_SAMPLE_POINTS)]:
        values = {symbol: point[index % len(point)] for index, symbol in enumerate(symbols)}
        first_value = first.evalf(_EVALUATION_DIGITS, subs=values)
        second_value = second.evalf(_EVALUATION_DIGITS, subs=values)
        if not (first_value.is_number and second_value.is_number):
            return False
        if not (first_value.is_finite and second_value.is_finite):
            continue
        if not _values_close(first_value, second_value):
            return False
        compared += 1
    return compared > 0


def _unordered_equal(first: tuple, second: tuple) -> bool:
    """Return whether two collections of expressions match one to one, in any order."""
    if len(first) != len(second):
        return False
    remaining = list(second)
    for item in first:
        for index, candidate in enumerate(remaining):
            if _expressions_equal(item, candidate):
                del remaining[index]
                break
        else:
            return False
    return True


def _answers_equal(first: _Answer, second: _Answer) -> bool:
    """Return whether two parsed answers have the same structure and equal parts."""
    if first.kind != second.kind or first.brackets != second.brackets:
        return False
    if len(first.parts) != len(second.parts):
        return False
    if first.kind in ("list", "set"):
        return _unordered_equal(first.parts, second.parts)
    if first.kind == "union":
        return all(_answers_equal(a, b) for a, b in zip(first.parts, second.parts, strict=True))
    if first.kind == "matrix":
        pairs = list(zip(first.parts, second.parts, strict=True))
        if any(len(a) != len(b) for a, b in pairs):
            return False
        return all(_expressions_equal(x, y) for a, b in pairs for x, y in zip(a, b, strict=True))
    return all(_expressions_equal(a, b) for a, b in zip(first.parts, second.parts, strict=True))


def latex_equivalent(predicted: str, gold: str) -> bool:
    """Return whether a predicted LaTeX answer equals the gold answer.

    The answers are equal when their normalised strings are equal (text answers of two or
    more letters ignore case). Otherwise both are parsed with the converter above and
    compared part by part: sympy equality, else a relative difference within 1e-6 when
    evaluated (at three sample points when there are variables). So "0.3333333" equals
    ``\\frac{1}{3}`` and "(x+2)(x+5)" equals "x^2+7x+10", but two different integers never
    match. Tuples and intervals need the same bracket pair and
    order, while bare lists ("1,-2") and ``\\{...\\}`` sets match in any order, with "a \\pm b"
    read as the two items a+b and a-b. Answers longer than 200 characters after
    normalisation, or outside the converter's subset (words, subscripts such as base
    ``204_5``, chained equations), get only the string check.
    """
    first = normalize_latex(predicted)
    second = normalize_latex(gold)
    if first == second:
        return True
    if re.fullmatch(r"[A-Za-z]{2,}", first) and first.casefold() == second.casefold():
        return True
    if not first or not second:
        return False
    if len(first) > MAX_SYMBOLIC_LENGTH or len(second) > MAX_SYMBOLIC_LENGTH:
        return False
    try:
        return _answers_equal(_parse_answer(first), _parse_answer(second))
    except _UnsupportedLatex:
        return False
    except Exception:
        # sympy has no single exception type for input it cannot handle, so any exception
        # means that the answers could not be shown equal.
        return False
