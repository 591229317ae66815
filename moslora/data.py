"""Math word problem datasets: loading, training targets, prompts and tokenisation.

Three file formats are read: GSM8K (``question``, ``answer`` ending in ``#### N``), MAWPS
(``original_text``, ``equation``, ``ans``) and the LLM-Adapters test files (``instruction``,
``input``, ``answer``). Only GSM8K and MAWPS carry reference solutions, so only they can be
trained on.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moslora.answers import FINAL_ANSWER_TEMPLATE, format_number

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss of Hugging Face causal LMs ignores."""


class DataError(ValueError):
    """Invalid or missing data. The message names the file, row and field, and the fix."""


@dataclass(frozen=True)
class Example:
    """One math problem with its gold answer."""

    id: str  # the row's own id, else "<dataset>-<split>-<row index>"
    question: str
    answer: float | str  # a number; a letter A-E for "choice"; a LaTeX string for "latex"
    target: (
        str | None
    )  # response ending in "The answer is N.", or None without a reference solution
    source: str  # "<file or Hub id>:<row index>"
    answer_type: str = "number"  # how a generation is scored: "number", "choice" or "latex"


@dataclass(frozen=True)
class DatasetSpec:
    """Location of a named dataset under the data folder, and of its Hub copy if one exists."""

    folder: str
    files: Mapping[str, str]
    format: str
    hub_id: str | None = None
    hub_config: str | None = None


_LLM_ADAPTERS = "llm-adapters"

DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec(
        "gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}, "gsm8k", "openai/gsm8k", "main"
    ),
    "mawps": DatasetSpec(
        "mawps", {"train": "train.json", "valid": "valid.json", "test": "test.json"}, "mawps"
    ),
    "svamp": DatasetSpec("svamp", {"test": "test.json"}, _LLM_ADAPTERS, "ChilleD/SVAMP"),
    "addsub": DatasetSpec("addsub", {"test": "test.json"}, _LLM_ADAPTERS),
    "singleeq": DatasetSpec("singleeq", {"test": "test.json"}, _LLM_ADAPTERS),
    "multiarith": DatasetSpec(
        "multiarith", {"test": "test.json"}, _LLM_ADAPTERS, "ChilleD/MultiArith"
    ),
    "aqua": DatasetSpec("aqua", {"test": "test.json"}, _LLM_ADAPTERS),
    "math500": DatasetSpec("math500", {"test": "test.jsonl"}, "math500"),
}

TRAINABLE = frozenset({"gsm8k", "mawps"})

# The fields that identify each file format in the first row.
_FORMAT_FIELDS = {
    "mawps": ("original_text", "ans", "equation"),
    "math500": ("problem", "answer"),
    _LLM_ADAPTERS: ("instruction", "answer"),
    "gsm8k": ("question", "answer"),
}

_TRAIN_ON_HINT = "Train on gsm8k or mawps, whose rows carry reference solutions."


# ---------------------------------------------------------------------------------------------
# Locating and reading files


def default_data_dir() -> Path:
    """Return the data folder named by $MOSLORA_DATA, raising DataError if unset or missing."""
    value = os.environ.get("MOSLORA_DATA", "").strip()
    if not value:
        raise DataError(
            "MOSLORA_DATA is not set. Set it to the folder that contains gsm8k/, mawps/, svamp/ "
            "and the other dataset folders, or pass --data-dir"
        )
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"MOSLORA_DATA={value} is not a folder. Set MOSLORA_DATA to the data folder "
            "or pass --data-dir"
        )
    return folder


def _named_dataset_file(name: str, split: str, data_dir: str | Path | None) -> Path:
    spec = DATASETS[name]
    if split not in spec.files:
        raise DataError(
            f"dataset {name!r} has no split {split!r}. Available splits: {', '.join(spec.files)}"
        )
    folder = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    path = folder / spec.folder / spec.files[split]
    if not path.is_file():
        hub_hint = f", or pass the Hub id {spec.hub_id!r}" if spec.hub_id else ""
        raise DataError(
            f"{path} not found. Set MOSLORA_DATA or pass --data-dir to the folder that "
            f"contains {spec.folder}/{hub_hint}"
        )
    return path


def _split_file_in_folder(folder: Path, split: str) -> Path:
    for suffix in (".json", ".jsonl"):
        path = folder / f"{split}{suffix}"
        if path.is_file():
            return path
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".jsonl"))
    raise DataError(
        f"{folder} has no {split}.json or {split}.jsonl (JSON files found: "
        f"{', '.join(found) or 'none'}). Pass an existing split or a file path"
    )


def _read_json_rows(path: Path) -> list[Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}. "
            "Fix the file or convert it to a JSON list of row objects"
        ) from error
    if not isinstance(value, list):
        raise DataError(
            f"{path}: the top-level JSON value is {_json_type(value)}, expected a list of row "
            "objects. Wrap the rows in [...] or write one object per line as .jsonl"
        )
    return value


def _read_jsonl_rows(path: Path) -> list[Any]:
    rows: list[Any] = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {line_number} (row {len(rows)}): invalid JSON: {error.msg}. "
                    "Each line of a .jsonl file must be one JSON object"
                ) from error
    return rows


def _read_rows(path: Path) -> list[Any]:
    try:
        if path.suffix == ".json":
            return _read_json_rows(path)
        if path.suffix == ".jsonl":
            return _read_jsonl_rows(path)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}). "
            "Save the file as UTF-8 JSON"
        ) from error
    raise DataError(f"{path}: unsupported file type {path.suffix!r}. Use a .json or .jsonl file")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub datasets


def _hub_config(hub_id: str) -> str | None:
    for spec in DATASETS.values():
        if spec.hub_id == hub_id:
            return spec.hub_config
    return None


def _from_hub_row(row: dict[str, Any]) -> dict[str, Any]:
    """Map the fields of ChilleD/SVAMP and ChilleD/MultiArith rows to the LLM-Adapters format."""
    if "Body" in row and "Question" in row:
        question = f"{str(row['Body']).strip()} {str(row['Question']).strip()}"
        return {"id": row.get("ID"), "instruction": question, "input": "", "answer": row["Answer"]}
    if "final_ans" in row:
        return {"instruction": row.get("question"), "input": "", "answer": row["final_ans"]}
    return row


def _load_hub_rows(hub_id: str, split: str) -> list[Any]:
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"{hub_id!r} is not a local file or folder, and loading it from the Hugging Face "
            "Hub needs the datasets package: pip install datasets"
        ) from error
    # NOTE: the offline tests replace `datasets` with a stub, so no test downloads from the Hub.
    try:
        table = datasets.load_dataset(hub_id, _hub_config(hub_id), split=split)
    except (OSError, ValueError) as error:
        raise DataError(
            f"loading split {split!r} of Hub dataset {hub_id!r} failed: {error}"
        ) from error
    return [_from_hub_row(dict(row)) for row in table]


# ---------------------------------------------------------------------------------------------
# Questions, answers and targets


_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+([.,?!;%)\]])")
_SPACE_AFTER_OPENER = re.compile(r"([(\[$])[ \t]+")
_SPLIT_CLITIC = re.compile(r"(\w)[ \t]+(n't|['’](?:s|re|ll|ve|m|d))\b", re.IGNORECASE)
_SPACED_HYPHEN = re.compile(r"(?<=[^\W\d_]) - (?=[^\W\d_])")
_SPACED_QUOTE = re.compile(r"(?<!\S)' ([^'\n]+?) '(?!\S)")


def _clean_tokenized_text(text: str) -> str:
    """Undo the word tokenisation of MAWPS-derived text: "section . If" becomes "section. If"."""
    text = re.sub(r"[ \t]+", " ", text)
    text = _SPACED_QUOTE.sub(r"'\1'", text)
    text = _SPLIT_CLITIC.sub(r"\1\2", text)
    text = _SPACED_HYPHEN.sub("-", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    text = _SPACE_AFTER_OPENER.sub(r"\1", text)
    return "\n".join(line.strip() for line in text.splitlines()).strip()


def normalize_question(text: str) -> str:
    """Lower-case a question and replace punctuation with spaces, for overlap detection."""
    without_punctuation = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(without_punctuation.split())


def drop_overlap(examples: list[Example], reference: list[Example]) -> tuple[list[Example], int]:
    """Remove the examples whose normalised question occurs in ``reference``.

    Returns the kept examples and the number of rows dropped (duplicated questions count once
    per row).
    """
    seen = {normalize_question(example.question) for example in reference}
    kept = [example for example in examples if normalize_question(example.question) not in seen]
    return kept, len(examples) - len(kept)


_GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _parse_gold(value: Any) -> float | None:
    """Parse a gold answer given as a JSON number or a numeric string, else return None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _GROUPED_NUMBER.fullmatch(text):
            text = text.replace(",", "")
        try:
            number = float(text)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


class _ArithmeticError(ValueError):
    """An expression that is not plain arithmetic on numbers."""


_OPERATORS: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _evaluate_node(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _evaluate_node(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        try:
            return _OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError as error:
            raise _ArithmeticError("division by zero") from error
    raise _ArithmeticError(f"unsupported expression {ast.dump(node)}")


def _evaluate_arithmetic(expression: str) -> float | None:
    """Evaluate + - * / on numbers without eval(), returning None for any other expression."""
    try:
        return _evaluate_node(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, _ArithmeticError):
        return None


_EXPRESSION_TOKEN = re.compile(r"\s*(?:(?P<number>\d+(?:\.\d*)?|\.\d+)|(?P<symbol>[-+*/()]))")


def _format_expression(expression: str) -> str | None:
    """Rewrite "((22.0-14.0)/4.0)" as "((22 - 14) / 4)", or return None for non-arithmetic text."""
    parts: list[str] = []
    previous = None
    position = 0
    expression = expression.strip()
    while position < len(expression):
        match = _EXPRESSION_TOKEN.match(expression, position)
        if match is None:
            return None
        position = match.end()
        if match.group("number") is not None:
            parts.append(format_number(float(match.group("number"))))
            previous = "number"
            continue
        symbol = match.group("symbol")
        is_unary = symbol in "+-" and previous in (None, "(", "operator")
        if symbol in "+-*/" and not is_unary:
            parts.append(f" {symbol} ")
            previous = "operator"
        else:
            parts.append(symbol)
            previous = "operator" if is_unary else symbol
    return "".join(parts)


def _is_close(value: float, expected: float, tolerance: float = 1e-3) -> bool:
    difference = abs(value - expected)
    return difference <= tolerance or difference <= tolerance * abs(expected)


def _mawps_equation_line(equation: Any, answer: float) -> str | None:
    """Return "((22 - 14) / 4) = 2." for an equation "X=((22.0-14.0)/4.0)" with answer 2.

    Returns None unless the equation has the form ``name=expression`` and the expression
    evaluates to the answer within 1e-3 (absolute or relative).
    """
    if not isinstance(equation, str):
        return None
    name, separator, expression = equation.partition("=")
    if not separator or "=" in expression or not name.strip().isidentifier():
        return None
    value = _evaluate_arithmetic(expression)
    if value is None or not _is_close(value, answer):
        return None
    formatted = _format_expression(expression)
    if formatted is None:
        return None
    return f"{formatted} = {format_number(answer)}."


_CALCULATOR_MARK = re.compile(r"<<[^<>]*>>")


def _gsm8k_target(solution: str, answer: float) -> str:
    """Remove calculator marks from a GSM8K solution and end it with the answer sentence."""
    body = _CALCULATOR_MARK.sub("", solution.rpartition("####")[0]).rstrip()
    final = FINAL_ANSWER_TEMPLATE.format(format_number(answer))
    return f"{body}\n{final}" if body else final


# ---------------------------------------------------------------------------------------------
# Rows to examples


@dataclass(frozen=True)
class _RowContext:
    """Origin of a row, used for ids, ``Example.source`` and error messages."""

    label: str
    index: int
    row_id: str | None
    dataset: str
    split: str

    @property
    def example_id(self) -> str:
        return self.row_id or f"{self.dataset}-{self.split}-{self.index}"

    @property
    def source(self) -> str:
        return f"{self.label}:{self.index}"

    def error(self, field: str, problem: str, fix: str) -> DataError:
        where = f"row {self.index}" + (f" (id {self.row_id})" if self.row_id else "")
        return DataError(f"{self.label}, {where}, field {field!r}: {problem}. {fix}.")


def _required_question(row: dict[str, Any], field: str, context: _RowContext) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if field not in row else f"is empty or not a string ({value!r})"
        raise context.error(field, problem, "Every row needs a non-empty question text")
    return value


def _required_answer(row: dict[str, Any], field: str, context: _RowContext) -> float:
    if field not in row or row[field] is None:
        raise context.error(field, "is missing", "Every row needs a numeric gold answer")
    answer = _parse_gold(row[field])
    if answer is None:
        raise context.error(
            field,
            f"is not a number: {row[field]!r}",
            "Write the gold answer as a number such as 12 or 0.75",
        )
    return answer


@dataclass
class _MawpsStats:
    rows: int = 0
    without_equation: int = 0


def _mawps_example(row: dict[str, Any], context: _RowContext, stats: _MawpsStats) -> Example:
    question = _clean_tokenized_text(_required_question(row, "original_text", context))
    answer = _required_answer(row, "ans", context)
    equation_line = _mawps_equation_line(row.get("equation"), answer)
    final = FINAL_ANSWER_TEMPLATE.format(format_number(answer))
    stats.rows += 1
    if equation_line is None:
        stats.without_equation += 1
    target = final if equation_line is None else f"{equation_line}\n{final}"
    return Example(context.example_id, question, answer, target, context.source)


def _gsm8k_example(row: dict[str, Any], context: _RowContext) -> Example:
    question = _required_question(row, "question", context).strip()
    solution = row.get("answer")
    if not isinstance(solution, str):
        raise context.error(
            "answer", "is missing or not a string", "Give the worked solution as a string"
        )
    if "####" not in solution:
        raise context.error(
            "answer",
            "has no final-answer line '#### N'",
            "End the GSM8K solution with a line '#### N' containing the numeric answer",
        )
    final_text = solution.rpartition("####")[2].strip()
    answer = _parse_gold(final_text)
    if answer is None:
        raise context.error(
            "answer",
            f"the text after '####' is not a number: {final_text!r}",
            "Write the final answer after '####' as a number such as 72 or 1,000",
        )
    return Example(
        context.example_id, question, answer, _gsm8k_target(solution, answer), context.source
    )


def _llm_adapters_example(row: dict[str, Any], context: _RowContext) -> Example:
    instruction = _clean_tokenized_text(_required_question(row, "instruction", context))
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n{_clean_tokenized_text(extra)}"
    # The `output` field is a rationale written by another model, not a reference solution.
    letter = row.get("answer")
    if (
        isinstance(letter, str)
        and _CHOICE_LETTER.fullmatch(letter.strip())
        and ("Answer Choices" in instruction)
    ):
        # AQuA-style multiple choice: the gold answer is the letter of the right choice.
        return Example(
            context.example_id, instruction, letter.strip(), None, context.source, "choice"
        )
    answer = _required_answer(row, "answer", context)
    return Example(context.example_id, instruction, answer, None, context.source)


_CHOICE_LETTER = re.compile(r"[A-E]")


def _math500_example(row: dict[str, Any], context: _RowContext) -> Example:
    problem = _required_question(row, "problem", context)
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise context.error("answer", "is missing or empty", "Every row needs its LaTeX answer")
    example_id = str(row.get("unique_id") or context.example_id)
    return Example(example_id, problem, answer.strip(), None, context.source, "latex")


def _detect_format(first_row: Any, label: str) -> str:
    if isinstance(first_row, dict):
        # The first match wins, so a row with both `instruction` and `question` is LLM-Adapters.
        for name, fields in _FORMAT_FIELDS.items():
            if all(field in first_row for field in fields):
                return name
        found = ", ".join(map(repr, first_row)) or "none"
    else:
        found = f"none (row 0 is {_json_type(first_row)})"
    expected = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in _FORMAT_FIELDS.items())
    raise DataError(
        f"{label}: unknown format, fields of row 0: {found}. Expected the fields of one of "
        f"these formats: {expected}"
    )


def _row_id(row: dict[str, Any]) -> str | None:
    value = row.get("id")
    if value is None or isinstance(value, bool) or str(value).strip() == "":
        return None
    return str(value)


def _examples_from_rows(
    rows: Sequence[Any], label: str, dataset: str, split: str, file_format: str
) -> list[Example]:
    examples = []
    stats = _MawpsStats()
    expected_fields = ", ".join(_FORMAT_FIELDS[file_format])
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{label}, row {index}: the row is {_json_type(row)}, expected a JSON object "
                f"with the fields {expected_fields}. Fix or remove the row."
            )
        context = _RowContext(label, index, _row_id(row), dataset, split)
        if file_format == "mawps":
            examples.append(_mawps_example(row, context, stats))
        elif file_format == "math500":
            examples.append(_math500_example(row, context))
        elif file_format == "gsm8k":
            examples.append(_gsm8k_example(row, context))
        else:
            examples.append(_llm_adapters_example(row, context))
    if stats.without_equation:
        logger.debug(
            "%s: %d of %d MAWPS equations are not of the form X=expression or do not evaluate "
            "to the answer, so those targets contain only the answer sentence",
            label,
            stats.without_equation,
            stats.rows,
        )
    return examples


# ---------------------------------------------------------------------------------------------
# Public loader


@dataclass(frozen=True)
class _RawSet:
    rows: list[Any]
    label: str
    dataset: str
    split: str


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _resolve(data: str, split: str, data_dir: str | Path | None) -> _RawSet:
    if data in DATASETS:
        path = _named_dataset_file(data, split, data_dir)
        return _RawSet(_read_rows(path), str(path), data, split)
    path = Path(data).expanduser()
    if path.is_dir():
        path = _split_file_in_folder(path, split)
    if path.is_file():
        dataset = path.resolve().parent.name or path.stem
        return _RawSet(_read_rows(path), str(path), dataset, path.stem)
    if _HUB_ID.fullmatch(data) and path.suffix not in (".json", ".jsonl"):
        label = f"{data}[{split}]"
        return _RawSet(_load_hub_rows(data, split), label, data.split("/")[1].lower(), split)
    raise DataError(
        f"{data!r} is not a dataset name ({', '.join(DATASETS)}), an existing .json/.jsonl "
        "file or folder, or a Hugging Face Hub id of the form owner/name"
    )


def load_examples(
    data: str,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    for_training: bool = False,
) -> list[Example]:
    """Load math word problems from a dataset name, a file, a folder or a Hub dataset id.

    A dataset name (a key of DATASETS) is read from ``data_dir`` (default $MOSLORA_DATA). A
    folder is searched for ``<split>.json`` or ``<split>.jsonl``. A Hub id ``owner/name`` is
    used only when no local path of that name exists. ``limit`` keeps the first rows, and only
    those are validated. ``for_training`` raises DataError for data without reference solutions.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}. Pass a positive --limit.")
    if for_training and data in DATASETS and data not in TRAINABLE:
        raise DataError(
            f"dataset {data!r} has no reference solutions to train on. {_TRAIN_ON_HINT}"
        )
    raw = _resolve(data, split, data_dir)
    rows = raw.rows if limit is None else raw.rows[:limit]
    if not rows:
        raise DataError(f"{raw.label}: contains no rows. Pass a file with at least one example.")
    file_format = _detect_format(rows[0], raw.label)
    if for_training and file_format == "math500":
        raise DataError(f"{raw.label}: MATH500 is a test set. {_TRAIN_ON_HINT}")
    if for_training and file_format == _LLM_ADAPTERS:
        raise DataError(
            f"{raw.label}: LLM-Adapters files have no reference solutions (their 'output' "
            f"field is a rationale written by another model). {_TRAIN_ON_HINT}"
        )
    return _examples_from_rows(rows, raw.label, raw.dataset, raw.split, file_format)


# ---------------------------------------------------------------------------------------------
# Prompts and tokenisation


INSTRUCTION_TEMPLATE = (
    "Solve this math word problem. Work it out in a few short steps, and end with a sentence "
    f'of the form "{FINAL_ANSWER_TEMPLATE.format("N")}" where N is the final number.\n\n'
    "{question}"
)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(question: str, tokenizer: Any = None) -> str:
    """Build the prompt for a question, in the tokenizer's chat template if it has one.

    Without a chat template (or without a tokenizer) the prompt is in the Alpaca format.
    """
    instruction = INSTRUCTION_TEMPLATE.format(question=question)
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return ALPACA_TEMPLATE.format(instruction=instruction)


_truncated_responses = 0


def _log_truncation(example: Example, max_length: int) -> None:
    """Count truncated responses and warn at the 1st, 10th, 100th ... occurrence."""
    global _truncated_responses
    _truncated_responses += 1
    count = _truncated_responses
    if count == 10 ** (len(str(count)) - 1):
        logger.warning(
            "truncated the response of %d example(s) so far to fit max_length=%d (latest: %s, "
            "%s). Raise --max-length to train on whole responses.",
            count,
            max_length,
            example.id,
            example.source,
        )


def tokenize_for_training(
    example: Example, tokenizer: Any, max_length: int
) -> dict[str, list[int]]:
    """Tokenise prompt + target + EOS, with labels set to -100 on the prompt tokens.

    A response that does not fit in ``max_length`` is cut at the end (with a rate-limited
    warning). A prompt that leaves no room for a single response token raises DataError.
    """
    if example.target is None:
        raise DataError(
            f"example {example.id} ({example.source}) has no reference solution. {_TRAIN_ON_HINT}"
        )
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise DataError("the tokenizer has no EOS token. Set tokenizer.eos_token before training.")
    prompt = build_prompt(example.question, tokenizer)
    # A chat template already writes the special tokens (such as BOS) into the prompt text.
    add_special_tokens = not _has_chat_template(tokenizer)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    response_ids = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    response_ids.append(eos_token_id)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DataError(
            f"example {example.id} ({example.source}): the prompt is {len(prompt_ids)} tokens, "
            f"which leaves no room for the response within max_length={max_length}. "
            "Raise --max-length."
        )
    if len(response_ids) > room:
        response_ids = response_ids[:room]
        _log_truncation(example, max_length)
    input_ids = prompt_ids + response_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


class CausalLMCollator:
    """Right-pad tokenised examples into a batch: pad token in input_ids, -100 in labels."""

    def __init__(self, tokenizer: Any) -> None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            raise DataError(
                "the tokenizer has no pad token. Set one, for example "
                "tokenizer.pad_token = tokenizer.eos_token"
            )
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        width = max(len(feature["input_ids"]) for feature in features)
        columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature in features:
            padding = width - len(feature["input_ids"])
            columns["input_ids"].append([*feature["input_ids"], *[self.pad_token_id] * padding])
            columns["attention_mask"].append([*feature["attention_mask"], *[0] * padding])
            columns["labels"].append([*feature["labels"], *[IGNORE_INDEX] * padding])
        return {name: torch.tensor(rows, dtype=torch.long) for name, rows in columns.items()}
