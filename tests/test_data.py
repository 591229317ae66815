"""Tests for dataset loading, training targets, prompts and tokenisation, on the real files."""

from __future__ import annotations

import json
import logging
import math
import sys
import types

import pytest
import torch

from moslora import data as data_module
from moslora.answers import FINAL_ANSWER_TEMPLATE, extract_answer, format_number, is_correct
from moslora.data import (
    DATASETS,
    TRAINABLE,
    CausalLMCollator,
    DataError,
    Example,
    build_prompt,
    default_data_dir,
    drop_overlap,
    load_examples,
    normalize_question,
    tokenize_for_training,
)

# Row counts of every dataset file, from the data folder's README.
ROW_COUNTS = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("mawps", "train"): 1898,
    ("mawps", "valid"): 237,
    ("mawps", "test"): 238,
    ("svamp", "test"): 1000,
    ("addsub", "test"): 395,
    ("singleeq", "test"): 508,
    ("multiarith", "test"): 600,
    ("aqua", "test"): 254,
    ("math500", "test"): 500,
}


def _write_json(path, value):
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _mawps_row(**fields):
    row = {
        "id": 7,
        "original_text": "Tom has 3 apples . How many ?",
        "equation": "X=3.0",
        "ans": 3.0,
    }
    row.update(fields)
    return row


# ---------------------------------------------------------------------------------------------
# Named datasets on the real files


def test_dataset_table_covers_every_split():
    assert set(ROW_COUNTS) == {
        (name, split) for name, spec in DATASETS.items() for split in spec.files
    }
    assert TRAINABLE == {"gsm8k", "mawps"}
    assert DATASETS["gsm8k"].hub_id == "openai/gsm8k"
    assert DATASETS["gsm8k"].hub_config == "main"
    assert DATASETS["svamp"].hub_id == "ChilleD/SVAMP"
    assert DATASETS["multiarith"].hub_id == "ChilleD/MultiArith"


@pytest.mark.parametrize(("name", "split"), sorted(ROW_COUNTS))
def test_named_dataset_loads(data_dir, name, split):
    examples = load_examples(name, split, data_dir=data_dir)
    path = data_dir / DATASETS[name].folder / DATASETS[name].files[split]

    assert len(examples) == ROW_COUNTS[(name, split)]
    assert len({example.id for example in examples}) == len(examples)
    assert all(
        example.question and example.question == example.question.strip() for example in examples
    )
    numeric = [example for example in examples if example.answer_type == "number"]
    assert all(math.isfinite(example.answer) for example in numeric)
    if name not in ("aqua", "math500"):
        assert len(numeric) == len(examples)
    assert all(example.source == f"{path}:{index}" for index, example in enumerate(examples))
    if name in TRAINABLE:
        assert all(
            example.target.endswith(FINAL_ANSWER_TEMPLATE.format(format_number(example.answer)))
            for example in examples
        )
    else:
        assert all(example.target is None for example in examples)


def test_named_dataset_reads_moslora_data(data_dir, monkeypatch):
    monkeypatch.setenv("MOSLORA_DATA", str(data_dir))
    examples = load_examples("svamp", limit=3)
    assert [example.id for example in examples] == ["svamp-test-0", "svamp-test-1", "svamp-test-2"]


def test_mawps_ids_are_row_ids(data_dir):
    rows = json.loads((data_dir / "mawps" / "test.json").read_text())
    examples = load_examples("mawps", "test", data_dir=data_dir)
    assert [example.id for example in examples] == [str(row["id"]) for row in rows]


def test_unknown_split_lists_available(data_dir):
    with pytest.raises(DataError) as caught:
        load_examples("mawps", "dev", data_dir=data_dir)
    message = str(caught.value)
    assert "'dev'" in message
    assert "train, valid, test" in message


def test_test_only_dataset_has_no_train_split(data_dir):
    with pytest.raises(DataError, match="Available splits: test"):
        load_examples("svamp", "train", data_dir=data_dir)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(DataError) as caught:
        load_examples("gsm8k", "test", data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "gsm8k" / "test.jsonl") in message
    assert "MOSLORA_DATA" in message
    assert "openai/gsm8k" in message


def test_file_and_folder_match_name(data_dir):
    by_name = load_examples("svamp", data_dir=data_dir)
    by_file = load_examples(str(data_dir / "svamp" / "test.json"))
    by_folder = load_examples(str(data_dir / "svamp"), "test")
    assert by_file == by_name
    assert by_folder == by_name


def test_folder_jsonl_split(data_dir):
    examples = load_examples(str(data_dir / "gsm8k"), "test", limit=2)
    assert [example.id for example in examples] == ["gsm8k-test-0", "gsm8k-test-1"]


def test_folder_without_split_file(tmp_path):
    _write_json(tmp_path / "train.json", [_mawps_row()])
    with pytest.raises(DataError) as caught:
        load_examples(str(tmp_path), "test")
    message = str(caught.value)
    assert "test.json or test.jsonl" in message
    assert "train.json" in message


def test_unknown_data_argument():
    with pytest.raises(DataError, match="not a dataset name"):
        load_examples("no such dataset")


def test_limit_keeps_first_rows(data_dir):
    examples = load_examples("gsm8k", "train", data_dir=data_dir, limit=5)
    assert [example.id for example in examples] == [f"gsm8k-train-{index}" for index in range(5)]


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one(data_dir, limit):
    with pytest.raises(DataError, match="limit"):
        load_examples("gsm8k", "train", data_dir=data_dir, limit=limit)


@pytest.mark.parametrize("name", ["svamp", "addsub", "singleeq", "multiarith"])
def test_for_training_rejects_test_only_sets(data_dir, name):
    with pytest.raises(DataError, match="gsm8k or mawps"):
        load_examples(name, data_dir=data_dir, for_training=True)


def test_for_training_rejects_llm_adapters_file(data_dir):
    with pytest.raises(DataError) as caught:
        load_examples(str(data_dir / "svamp" / "test.json"), for_training=True)
    assert "'output'" in str(caught.value)
    assert "gsm8k or mawps" in str(caught.value)


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_for_training_accepts_trainable(data_dir, name):
    examples = load_examples(name, "train", data_dir=data_dir, limit=3, for_training=True)
    assert all(example.target for example in examples)


# ---------------------------------------------------------------------------------------------
# Questions and targets


def test_mawps_first_row(data_dir):
    example = load_examples("mawps", "train", data_dir=data_dir, limit=1)[0]
    assert example == Example(
        id="2351",
        question=(
            "A waiter had 22 customers in his section. If 14 of them left and the rest of his "
            "tables had 4 people at each table, how many tables did he have?"
        ),
        answer=2.0,
        target="((22 - 14) / 4) = 2.\nThe answer is 2.",
        source=f"{data_dir / 'mawps' / 'train.json'}:0",
    )


def test_mawps_targets_on_all_train_rows(data_dir):
    for example in load_examples("mawps", "train", data_dir=data_dir):
        assert example.target.endswith(
            FINAL_ANSWER_TEMPLATE.format(format_number(example.answer))
        ), example
        assert is_correct(extract_answer(example.target), example.answer), example


def _by_id(examples):
    return {example.id: example for example in examples}


def test_mawps_unary_minus_equation(data_dir):
    # Row 1967 has the equation "number=1.477/-7.0" and the answer -0.211.
    example = _by_id(load_examples("mawps", "train", data_dir=data_dir))["1967"]
    assert example.target == "1.477 / -7 = -0.211.\nThe answer is -0.211."


@pytest.mark.parametrize(
    ("row_id", "reason"),
    [
        ("19", "equation with x on both sides: (7.0*x)+4.0=(3.0*x)-20.0"),
        ("787", "implicit equation: X-6=52"),
        ("603", "two equals signs: X=0.32=0.21"),
        ("1679", "X=1222-513 evaluates to 709, but the answer is 208"),
        ("756", "X=34*4 evaluates to 136, but the answer is 134"),
    ],
)
def test_mawps_target_omits_bad_equation(data_dir, row_id, reason):
    example = _by_id(load_examples("mawps", "train", data_dir=data_dir))[row_id]
    assert example.target == FINAL_ANSWER_TEMPLATE.format(format_number(example.answer)), reason


def test_mawps_counts_omitted_equations(data_dir, caplog):
    with caplog.at_level(logging.DEBUG, logger="moslora.data"):
        load_examples("mawps", "train", data_dir=data_dir)
    assert "36 of 1898 MAWPS equations" in caplog.text


def test_mawps_string_answers(tmp_path):
    path = _write_json(
        tmp_path / "test.json",
        [
            _mawps_row(ans="43", equation="X=40+3"),
            _mawps_row(id=8, ans="0.75", equation="X=0.5+0.25"),
        ],
    )
    examples = load_examples(str(path))
    assert [example.answer for example in examples] == [43.0, 0.75]
    assert examples[0].target == "40 + 3 = 43.\nThe answer is 43."


@pytest.mark.parametrize(
    ("tokenized", "clean"),
    [
        ("Tom has 3 apples . How many ?", "Tom has 3 apples. How many?"),
        ("He did n't go , but she could n't stay .", "He didn't go, but she couldn't stay."),
        ("April 's shop and her friend ’s dog .", "April's shop and her friend’s dog."),
        (
            "It costs $ 5.20 , a 15 % tip ( based on food ) .",
            "It costs $5.20, a 15% tip (based on food).",
        ),
        ("a T - shirt and a one - time fee", "a T-shirt and a one-time fee"),
        ("at the ' dunk a clown ' booth", "at the 'dunk a clown' booth"),
        ("  two   spaces  ", "two spaces"),
        ("7 - 3 apples", "7 - 3 apples"),
    ],
)
def test_mawps_question_cleaning(tmp_path, tokenized, clean):
    path = _write_json(tmp_path / "test.json", [_mawps_row(original_text=tokenized)])
    assert load_examples(str(path))[0].question == clean


def test_llm_adapters_question_with_input(tmp_path):
    rows = [
        {"instruction": "Add the numbers .", "input": "3 and 4", "output": "7", "answer": "7.0"}
    ]
    example = load_examples(str(_write_json(tmp_path / "test.json", rows)))[0]
    assert example.question == "Add the numbers.\n3 and 4"
    assert example.answer == 7.0
    assert example.target is None


def test_llm_adapters_output_is_never_used(data_dir):
    rows = json.loads((data_dir / "svamp" / "test.json").read_text())
    examples = load_examples("svamp", data_dir=data_dir)
    assert all(
        row["output"].strip() not in example.question
        for row, example in zip(rows, examples, strict=True)
    )


def test_gsm8k_first_row(data_dir):
    example = load_examples("gsm8k", "train", data_dir=data_dir, limit=1)[0]
    assert example.answer == 72.0
    assert example.target == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is 72."
    )


def test_gsm8k_targets_on_first_train_rows(data_dir):
    examples = load_examples("gsm8k", "train", data_dir=data_dir, limit=500)
    assert len(examples) == 500
    for example in examples:
        assert "<<" not in example.target, example.id
        assert "####" not in example.target, example.id
        assert example.target.endswith(
            FINAL_ANSWER_TEMPLATE.format(format_number(example.answer))
        ), example.id
        assert is_correct(extract_answer(example.target), example.answer), example.id


def test_gsm8k_answers_with_commas_and_signs(data_dir):
    rows = [
        json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()
    ]
    finals = [row["answer"].rpartition("####")[2].strip() for row in rows]
    examples = load_examples("gsm8k", "train", data_dir=data_dir)
    comma_row = finals.index("1,080")
    negative_row = finals.index("-7")
    assert examples[comma_row].answer == 1080.0
    assert examples[comma_row].target.endswith("\nThe answer is 1080.")
    assert examples[negative_row].answer == -7.0
    assert examples[negative_row].target.endswith("\nThe answer is -7.")


# ---------------------------------------------------------------------------------------------
# Overlap between test and training questions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tom has 3 apples . How many ?", "tom has 3 apples how many"),
        ("Tom has 3 apples. How many?", "tom has 3 apples how many"),
        ("  A   B\nC ", "a b c"),
        ("It costs $5.20!", "it costs 5 20"),
    ],
)
def test_normalize_question(text, expected):
    assert normalize_question(text) == expected


def test_drop_overlap_mawps_test_minus_train(data_dir):
    train = load_examples("mawps", "train", data_dir=data_dir)
    test = load_examples("mawps", "test", data_dir=data_dir)
    kept, dropped = drop_overlap(test, train)
    train_questions = {normalize_question(example.question) for example in train}
    dropped_questions = {normalize_question(example.question) for example in test} - {
        normalize_question(example.question) for example in kept
    }

    # 27 unique questions, one of which occurs twice in mawps/test, so 28 rows go.
    assert len(dropped_questions) == 27
    assert dropped == 28
    assert len(kept) == 210
    assert not any(normalize_question(example.question) in train_questions for example in kept)


def test_drop_overlap_keeps_order_without_reference():
    examples = [Example(str(index), f"Question {index}?", 1.0, None, "x") for index in range(3)]
    assert drop_overlap(examples, []) == (examples, 0)


def _raw_questions(path):
    return {
        normalize_question(row.get("original_text") or row["instruction"])
        for row in json.loads(path.read_text())
    }


@pytest.mark.parametrize(
    ("name", "in_mawps_train", "in_mawps_test"),
    [("addsub", 327, 58), ("singleeq", 415, 62), ("multiarith", 432, 49), ("svamp", 0, 0)],
)
def test_raw_overlap_matches_data_readme(data_dir, name, in_mawps_train, in_mawps_test):
    questions = _raw_questions(data_dir / name / "test.json")
    assert len(questions & _raw_questions(data_dir / "mawps" / "train.json")) == in_mawps_train
    assert len(questions & _raw_questions(data_dir / "mawps" / "test.json")) == in_mawps_test


@pytest.mark.parametrize(
    ("name", "in_mawps_train", "in_mawps_test"),
    # multiarith overlaps more once the tokenised contractions of MAWPS ("did n't") are rejoined,
    # because its own copies of the same questions are written "didn't".
    [("addsub", 327, 58), ("singleeq", 415, 62), ("multiarith", 470, 53), ("svamp", 0, 0)],
)
def test_cleaned_overlap(data_dir, name, in_mawps_train, in_mawps_test):
    def questions(dataset, split="test"):
        return {
            normalize_question(e.question) for e in load_examples(dataset, split, data_dir=data_dir)
        }

    assert len(questions(name) & questions("mawps", "train")) == in_mawps_train
    assert len(questions(name) & questions("mawps", "test")) == in_mawps_test


# ---------------------------------------------------------------------------------------------
# Data folder


def test_default_data_dir_unset(monkeypatch):
    monkeypatch.delenv("MOSLORA_DATA", raising=False)
    with pytest.raises(DataError) as caught:
        default_data_dir()
    assert "MOSLORA_DATA" in str(caught.value)
    assert "--data-dir" in str(caught.value)


def test_default_data_dir_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MOSLORA_DATA", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="not a folder"):
        default_data_dir()


def test_default_data_dir_set(monkeypatch, tmp_path):
    monkeypatch.setenv("MOSLORA_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path


# ---------------------------------------------------------------------------------------------
# Malformed input


def _error_message(path, **kwargs):
    with pytest.raises(DataError) as caught:
        load_examples(str(path), **kwargs)
    message = str(caught.value)
    assert str(path) in message
    return message


def test_json_not_parseable(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('[{"original_text": "x",\n  oops]', encoding="utf-8")
    message = _error_message(path)
    assert "invalid JSON" in message
    assert "line 2" in message


def test_jsonl_line_not_parseable(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": \n', encoding="utf-8")
    message = _error_message(path)
    assert "line 3" in message
    assert "row 1" in message
    assert "invalid JSON" in message


def test_json_top_level_not_list(tmp_path):
    message = _error_message(_write_json(tmp_path / "test.json", {"rows": []}))
    assert "top-level" in message
    assert "an object" in message


def test_row_not_object(tmp_path):
    path = _write_json(tmp_path / "test.json", [_mawps_row(), "a string"])
    message = _error_message(path)
    assert "row 1" in message
    assert "a string" in message
    assert "original_text" in message


def test_first_row_unknown_fields(tmp_path):
    path = _write_json(tmp_path / "test.json", [{"problem": "p", "solution": "s"}])
    message = _error_message(path)
    assert "'problem', 'solution'" in message
    assert "mawps" in message
    assert "gsm8k" in message
    assert "llm-adapters" in message


def test_missing_question(tmp_path):
    path = _write_jsonl(
        tmp_path / "train.jsonl", [{"question": "q", "answer": "#### 1"}, {"answer": "#### 2"}]
    )
    message = _error_message(path)
    assert "row 1" in message
    assert "'question'" in message
    assert "missing" in message


def test_empty_question(tmp_path):
    path = _write_json(
        tmp_path / "test.json", [_mawps_row(), _mawps_row(id=99, original_text="  ")]
    )
    message = _error_message(path)
    assert "row 1 (id 99)" in message
    assert "'original_text'" in message
    assert "empty" in message


def test_missing_answer(tmp_path):
    row = _mawps_row()
    del row["ans"]
    path = _write_json(tmp_path / "test.json", [_mawps_row(), row])
    message = _error_message(path)
    assert "row 1 (id 7)" in message
    assert "'ans'" in message
    assert "missing" in message


@pytest.mark.parametrize("answer", ["abc", "", "nan", "inf", True, [1]])
def test_answer_not_a_number(tmp_path, answer):
    rows = [
        {"instruction": "q1", "input": "", "answer": "1"},
        {"instruction": "q2", "input": "", "answer": answer},
    ]
    message = _error_message(_write_json(tmp_path / "test.json", rows))
    assert "row 1" in message
    assert "'answer'" in message
    assert "not a number" in message


def test_letter_answer_without_choices_rejected(tmp_path):
    # A letter is a valid gold answer only for a question that lists its answer choices.
    path = _write_json(
        tmp_path / "test.json", [{"instruction": "How many?", "input": "", "answer": "A"}]
    )
    message = _error_message(path)
    assert "row 0" in message
    assert "'answer'" in message
    assert "'A'" in message


def test_gsm8k_answer_without_marker(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "It is 5."}])
    message = _error_message(path)
    assert "row 0" in message
    assert "'answer'" in message
    assert "####" in message


def test_gsm8k_final_answer_not_a_number(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "So.\n#### five"}])
    message = _error_message(path)
    assert "row 0" in message
    assert "'five'" in message


@pytest.mark.parametrize(("file_name", "content"), [("test.json", "[]"), ("test.jsonl", "\n\n")])
def test_empty_file(tmp_path, file_name, content):
    path = tmp_path / file_name
    path.write_text(content, encoding="utf-8")
    assert "no rows" in _error_message(path)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("question,answer\n", encoding="utf-8")
    assert ".csv" in _error_message(path)


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub ids, with `datasets` replaced by a stub


def test_hub_id_without_datasets_package(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_examples("someone/some-dataset")


@pytest.fixture
def hub_stub(monkeypatch, tmp_path):
    """Replace `datasets` with a stub whose load_dataset returns the rows stored in ``tables``."""
    calls = []
    tables = {}

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return tables[path]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls, tables


def test_hub_svamp_fields(hub_stub):
    calls, tables = hub_stub
    tables["ChilleD/SVAMP"] = [
        {
            "ID": "chal-1",
            "Body": "Jack had 8 pens .",
            "Question": "How many now?",
            "Answer": 8.0,
            "Equation": "( 8.0 )",
            "Type": "x",
        }
    ]
    example = load_examples("ChilleD/SVAMP", "test")[0]
    assert calls == [("ChilleD/SVAMP", None, "test")]
    assert example.id == "chal-1"
    assert example.question == "Jack had 8 pens. How many now?"
    assert example.answer == 8.0
    assert example.target is None
    assert example.source == "ChilleD/SVAMP[test]:0"


def test_hub_multiarith_fields(hub_stub):
    _, tables = hub_stub
    tables["ChilleD/MultiArith"] = [{"question": " Sam had 3 apples. ", "final_ans": "3"}]
    example = load_examples("ChilleD/MultiArith", "test")[0]
    assert example.id == "multiarith-test-0"
    assert example.question == "Sam had 3 apples."
    assert example.answer == 3.0


def test_hub_gsm8k_uses_main_config(hub_stub):
    calls, tables = hub_stub
    tables["openai/gsm8k"] = [{"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}]
    example = load_examples("openai/gsm8k", "train", for_training=True)[0]
    assert calls == [("openai/gsm8k", "main", "train")]
    assert example.target == "2+2=4\nThe answer is 4."


def test_local_path_wins_over_hub_id(hub_stub, tmp_path):
    calls, _ = hub_stub
    folder = tmp_path / "owner" / "name"
    folder.mkdir(parents=True)
    _write_json(folder / "test.json", [_mawps_row()])
    assert load_examples("owner/name")[0].id == "7"
    assert calls == []


# ---------------------------------------------------------------------------------------------
# Prompts and tokenisation


def test_alpaca_prompt_without_tokenizer():
    prompt = build_prompt("How many apples?")
    assert prompt.startswith("Below is an instruction that describes a task.")
    assert "### Instruction:\n" in prompt
    assert prompt.endswith("How many apples?\n\n### Response:\n")
    assert '"The answer is N."' in prompt


def test_chat_prompt(smollm2_tokenizer):
    prompt = build_prompt("How many apples?", smollm2_tokenizer)
    assert "<|im_start|>user\n" in prompt
    assert "How many apples?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.fixture
def mawps_example(data_dir):
    return load_examples("mawps", "train", data_dir=data_dir, limit=1)[0]


def test_labels_mask_prompt_tokens(smollm2_tokenizer, mawps_example):
    features = tokenize_for_training(mawps_example, smollm2_tokenizer, max_length=512)
    prompt = build_prompt(mawps_example.question, smollm2_tokenizer)
    prompt_ids = smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    labels = features["labels"]

    assert features["input_ids"][: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert -100 not in labels[len(prompt_ids) :]
    assert labels[len(prompt_ids) :] == features["input_ids"][len(prompt_ids) :]
    assert features["attention_mask"] == [1] * len(features["input_ids"])
    assert len(labels) == len(features["input_ids"])


def test_label_tokens_decode_to_target(smollm2_tokenizer, mawps_example):
    labels = tokenize_for_training(mawps_example, smollm2_tokenizer, max_length=512)["labels"]
    response = [token for token in labels if token != -100]
    assert response[-1] == smollm2_tokenizer.eos_token_id
    assert smollm2_tokenizer.decode(response) == mawps_example.target + smollm2_tokenizer.eos_token


def test_prompt_too_long(smollm2_tokenizer, mawps_example):
    with pytest.raises(DataError) as caught:
        tokenize_for_training(mawps_example, smollm2_tokenizer, max_length=16)
    message = str(caught.value)
    assert mawps_example.id in message
    assert mawps_example.source in message
    assert "max_length=16" in message
    assert "--max-length" in message


def test_prompt_filling_max_length(smollm2_tokenizer, mawps_example):
    prompt = build_prompt(mawps_example.question, smollm2_tokenizer)
    prompt_length = len(smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with pytest.raises(DataError, match="no room for the response"):
        tokenize_for_training(mawps_example, smollm2_tokenizer, max_length=prompt_length)


def test_long_response_truncated(smollm2_tokenizer, mawps_example, monkeypatch, caplog):
    monkeypatch.setattr(data_module, "_truncated_responses", 0)
    prompt = build_prompt(mawps_example.question, smollm2_tokenizer)
    prompt_length = len(smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="moslora.data"):
        features = tokenize_for_training(
            mawps_example, smollm2_tokenizer, max_length=prompt_length + 3
        )
    assert len(features["input_ids"]) == prompt_length + 3
    assert len([token for token in features["labels"] if token != -100]) == 3
    assert "truncated the response of 1 example(s)" in caplog.text
    assert mawps_example.id in caplog.text


def test_tokenize_needs_target(smollm2_tokenizer):
    example = Example("svamp-test-0", "How many?", 3.0, None, "svamp/test.json:0")
    with pytest.raises(DataError, match="gsm8k or mawps"):
        tokenize_for_training(example, smollm2_tokenizer, max_length=512)


class _PlainTokenizer:
    """Tokenizer without a chat template: one token per character, BOS 1 with special tokens."""

    chat_template = None
    eos_token_id = 0
    pad_token_id = None

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        ids = [ord(character) for character in text]
        return {"input_ids": [1, *ids] if add_special_tokens else ids}


def test_plain_tokenizer_gets_special_tokens():
    tokenizer = _PlainTokenizer()
    example = Example("e", "Q?", 1.0, "The answer is 1.", "x:0")
    features = tokenize_for_training(example, tokenizer, max_length=4096)
    prompt_length = 1 + len(build_prompt("Q?"))

    assert tokenizer.calls == [True, False]
    assert features["input_ids"][0] == 1
    assert features["labels"][:prompt_length] == [-100] * prompt_length
    assert features["labels"][prompt_length:] == [ord(c) for c in "The answer is 1."] + [0]


def test_collator_right_pads(smollm2_tokenizer, data_dir):
    examples = load_examples("mawps", "train", data_dir=data_dir, limit=2)
    features = [
        tokenize_for_training(example, smollm2_tokenizer, max_length=512) for example in examples
    ]
    features[1] = {name: values[:-5] for name, values in features[0].items()}
    batch = CausalLMCollator(smollm2_tokenizer)(features)
    width = len(features[0]["input_ids"])
    pad_id = smollm2_tokenizer.pad_token_id

    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == features[0]["input_ids"]
    assert batch["input_ids"][1].tolist() == features[1]["input_ids"] + [pad_id] * 5
    assert batch["attention_mask"][1].tolist() == [1] * (width - 5) + [0] * 5
    assert batch["labels"][1].tolist() == features[1]["labels"] + [-100] * 5


def test_collator_needs_pad_token():
    with pytest.raises(DataError, match="pad token"):
        CausalLMCollator(_PlainTokenizer())


def test_collator_empty_batch(smollm2_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        CausalLMCollator(smollm2_tokenizer)([])


def test_non_utf8_file_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe[]")
    with pytest.raises(DataError, match="bad.json: not UTF-8 text"):
        load_examples(str(path))


def test_missing_nested_json_path_is_not_a_hub_id(tmp_path):
    with pytest.raises(DataError, match="is not a dataset name"):
        load_examples("d/nonexistent.json")


def test_aqua_loads_letter_answers(data_dir):
    examples = load_examples("aqua")
    assert len(examples) == 254
    assert all(example.answer_type == "choice" for example in examples)
    assert {example.answer for example in examples} <= set("ABCDE")
    assert "Answer Choices" in examples[0].question


def test_math500_loads_latex_answers(data_dir):
    examples = load_examples("math500")
    assert len(examples) == 500
    assert all(example.answer_type == "latex" for example in examples)
    assert examples[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert examples[0].id == "test/precalculus/807.json"


@pytest.mark.parametrize("name", ["aqua", "math500"])
def test_test_only_sets_refuse_training(data_dir, name):
    with pytest.raises(DataError, match="gsm8k or mawps"):
        load_examples(name, "test", for_training=True)


def test_math500_file_refuses_training(data_dir, tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match="MATH500 is a test set"):
        load_examples(str(path), for_training=True)
