"""Tests of batched generation, scoring, result files and resuming an interrupted evaluation."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from moslora import evaluate as ev
from moslora import hub
from moslora.data import Example, build_prompt, load_examples


class ScriptedModel:
    """Stands in for a causal LM: continues each prompt with the reply of the question in it.

    It records the keyword arguments of every ``generate`` call, checks that the batch is
    padded on the left, and raises on call number ``fail_on_call`` (counted from 1).
    """

    def __init__(self, tokenizer, replies: dict[str, str], fail_on_call: int | None = None):
        self.tokenizer = tokenizer
        self.replies = replies
        self.fail_on_call = fail_on_call
        self.calls: list[dict] = []
        self.prompts: list[str] = []

    def reply_for(self, prompt: str) -> str:
        matches = [question for question in self.replies if question in prompt]
        assert len(matches) == 1, f"no unique scripted reply for {prompt!r}"
        return self.replies[matches[0]]

    def generate(self, *, input_ids, attention_mask, max_new_tokens, pad_token_id, **options):
        self.calls.append({"batch_size": len(input_ids), "pad_token_id": pad_token_id, **options})
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("scripted failure")
        assert bool(attention_mask[:, -1].all()), "prompts must be padded on the left"

        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            reply = self.tokenizer(self.reply_for(prompt), add_special_tokens=False)["input_ids"]
            rows.append([*reply[:max_new_tokens], self.tokenizer.eos_token_id])
        width = max(len(row) for row in rows)
        padded = [row + [pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(padded, dtype=input_ids.dtype)], dim=1)


def make_examples(count: int) -> list[Example]:
    # Questions of different lengths, so that sorting by length reorders them.
    return [
        Example(
            id=f"q{index}",
            question=f"Problem {index}: " + "apples and pears " * (index % 3) + f"ask {index}?",
            answer=float(index),
            target=None,
            source=f"test:{index}",
        )
        for index in range(count)
    ]


def replies_for(examples: list[Example], wrong: set[str] = frozenset()) -> dict[str, str]:
    replies = {}
    for example in examples:
        answer = example.answer + 100 if example.id in wrong else example.answer
        replies[example.question] = f"Some steps.\nThe answer is {answer:g}."
    return replies


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_lm(smollm2_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        # Large weights spread the logits, so greedy choices are not decided by rounding.
        initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


# --- GenerationConfig and stop strings ---------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("max_new_tokens", 0, "--max-new-tokens"),
        ("batch_size", 0, "--batch-size"),
        ("batch_size", 2.5, "--batch-size"),
        ("num_beams", -1, "--num-beams"),
    ],
)
def test_generation_config_rejects_invalid(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        ev.GenerationConfig(**{field: value})


def test_generation_config_stop_strings():
    assert ev.GenerationConfig(stop_strings="END").stop_strings == ("END",)
    assert ev.GenerationConfig(stop_strings=["a", "b"]).stop_strings == ("a", "b")
    with pytest.raises(ValueError, match="--stop-strings"):
        ev.GenerationConfig(stop_strings=["ok", ""])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 4.", "The answer is 4."),
        ("The answer is 4.\n\n\nQuestion: next", "The answer is 4."),
        ("4 Question: x\n\n\n y", "4 "),
        ("### Instruction: more", ""),
    ],
)
def test_cut_at_stop_strings(text, expected):
    assert ev.cut_at_stop_strings(text, ev.DEFAULT_STOP_STRINGS) == expected


# --- generate --------------------------------------------------------------------------------


def test_batched_generation_matches_single(tiny_lm, smollm2_tokenizer):
    questions = [
        "How many?",
        "Sam has 5 marbles and gives 2 to Ann. How many marbles does Sam have left now?",
        "A train travels 60 miles in 1.5 hours. " * 4 + "What is its speed?",
        "Add 3 and 4.",
        "Mia reads 12 pages a day for 9 days. How many pages?",
    ]
    prompts = [build_prompt(question, smollm2_tokenizer) for question in questions]
    lengths = [len(smollm2_tokenizer(prompt)["input_ids"]) for prompt in prompts]
    assert len(set(lengths)) == len(prompts), "the prompts must need different padding"

    config_single = ev.GenerationConfig(max_new_tokens=12, batch_size=1, stop_strings=())
    config_batched = ev.GenerationConfig(max_new_tokens=12, batch_size=3, stop_strings=())
    single = [
        ev.generate(tiny_lm, smollm2_tokenizer, [prompt], config_single)[0] for prompt in prompts
    ]
    batched = ev.generate(tiny_lm, smollm2_tokenizer, prompts, config_batched)

    assert batched == single
    assert len(set(single)) == len(prompts), "distinct prompts should give distinct outputs"
    assert all(single)


def test_generate_keeps_input_order(smollm2_tokenizer):
    examples = make_examples(7)
    model = ScriptedModel(smollm2_tokenizer, {e.question: f"reply {e.id}" for e in examples})
    prompts = [build_prompt(example.question, smollm2_tokenizer) for example in examples]
    done = []

    outputs = ev.generate(
        model, smollm2_tokenizer, prompts, ev.GenerationConfig(batch_size=3), progress=done.append
    )

    assert outputs == [f"reply {example.id}" for example in examples]
    assert [call["batch_size"] for call in model.calls] == [3, 3, 1]
    assert done == [3, 3, 1]
    # The prompt with the most tokens comes in the first batch.
    longest = max(prompts, key=lambda prompt: len(smollm2_tokenizer(prompt)["input_ids"]))
    assert model.prompts[0] in longest


def test_generate_passes_greedy_options(smollm2_tokenizer):
    model = ScriptedModel(smollm2_tokenizer, {"Hello": "Hi"})
    config = ev.GenerationConfig(max_new_tokens=5, num_beams=2)
    ev.generate(model, smollm2_tokenizer, ["Hello there"], config)
    (call,) = model.calls
    assert call["do_sample"] is False
    assert call["num_beams"] == 2
    assert call["stop_strings"] == list(ev.DEFAULT_STOP_STRINGS)
    assert call["tokenizer"] is smollm2_tokenizer
    assert call["pad_token_id"] == smollm2_tokenizer.pad_token_id


def test_generate_cuts_stop_strings(smollm2_tokenizer):
    reply = "Steps.\nThe answer is 4.\n\n\nQuestion: What is 2 + 2?"
    model = ScriptedModel(smollm2_tokenizer, {"first": reply, "second": "### Instruction: go"})
    outputs = ev.generate(model, smollm2_tokenizer, ["first", "second"])
    assert outputs == ["Steps.\nThe answer is 4.", ""]

    uncut = ev.generate(model, smollm2_tokenizer, ["first"], ev.GenerationConfig(stop_strings=()))
    assert uncut == [reply]
    assert "stop_strings" not in model.calls[-1]


def test_generate_restores_padding_side(smollm2_tokenizer):
    model = ScriptedModel(smollm2_tokenizer, {"Hello": "Hi"}, fail_on_call=2)
    before = smollm2_tokenizer.padding_side
    smollm2_tokenizer.padding_side = "right"
    try:
        assert ev.generate(model, smollm2_tokenizer, ["Hello"]) == ["Hi"]
        assert smollm2_tokenizer.padding_side == "right"
        with pytest.raises(RuntimeError, match="scripted failure"):
            ev.generate(model, smollm2_tokenizer, ["Hello"])
        assert smollm2_tokenizer.padding_side == "right"
    finally:
        smollm2_tokenizer.padding_side = before


# --- evaluate --------------------------------------------------------------------------------

METADATA = {"dataset": "unit", "split": "test", "model": "scripted", "adapter": None}


def test_evaluate_writes_results(smollm2_tokenizer, tmp_path):
    examples = make_examples(5)
    model = ScriptedModel(smollm2_tokenizer, replies_for(examples, wrong={"q1", "q3"}))
    config = ev.GenerationConfig(batch_size=2, max_new_tokens=32)

    summary = ev.evaluate(
        model, smollm2_tokenizer, examples, config, output_dir=tmp_path, metadata=METADATA
    )

    records = read_jsonl(tmp_path / ev.PREDICTIONS_NAME)
    assert [record["id"] for record in records] == [example.id for example in examples]
    first = records[0]
    assert first["question"] == examples[0].question
    assert first["gold"] == 0.0
    assert first["generation"] == "Some steps.\nThe answer is 0."
    assert first["extracted"] == 0.0
    assert first["correct"] is True
    assert records[1]["extracted"] == 101.0
    assert records[1]["correct"] is False
    assert [record["correct"] for record in records] == [True, False, True, False, True]
    reply_tokens = [
        len(smollm2_tokenizer(record["generation"], add_special_tokens=False)["input_ids"])
        for record in records
    ]
    assert [record["generated_tokens"] for record in records] == reply_tokens

    assert json.loads((tmp_path / ev.SUMMARY_NAME).read_text()) == summary
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["correct"] == 3
    assert summary["count"] == 5
    for key, value in METADATA.items():
        assert summary[key] == value
    assert summary["generation"] == {
        "max_new_tokens": 32,
        "batch_size": 2,
        "stop_strings": list(ev.DEFAULT_STOP_STRINGS),
        "num_beams": 1,
    }
    assert summary["generated_tokens"] == sum(reply_tokens)
    assert summary["wall_time_s"] >= 0
    assert summary["resumed_count"] == 0
    assert datetime.fromisoformat(summary["date"]).tzinfo is not None
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ev.PREDICTIONS_NAME,
        ev.SUMMARY_NAME,
    ]


def test_evaluate_resumes_partial(smollm2_tokenizer, tmp_path):
    examples = make_examples(5)
    failing = ScriptedModel(smollm2_tokenizer, replies_for(examples), fail_on_call=2)
    with pytest.raises(RuntimeError, match="scripted failure"):
        ev.evaluate(
            failing,
            smollm2_tokenizer,
            examples,
            ev.GenerationConfig(batch_size=2),
            output_dir=tmp_path,
            metadata=METADATA,
        )
    partial = read_jsonl(tmp_path / ev.PARTIAL_NAME)
    assert len(partial) == 2
    assert (tmp_path / ev.PARTIAL_META_NAME).is_file()
    assert not (tmp_path / ev.SUMMARY_NAME).exists()

    # A different batch size still resumes, because it is not part of the run key.
    model = ScriptedModel(smollm2_tokenizer, replies_for(examples))
    done = []
    summary = ev.evaluate(
        model,
        smollm2_tokenizer,
        examples,
        ev.GenerationConfig(batch_size=4),
        output_dir=tmp_path,
        metadata=METADATA,
        progress=done.append,
    )

    assert [call["batch_size"] for call in model.calls] == [3]
    already_done = {record["question"] for record in partial}
    assert not any(question in prompt for prompt in model.prompts for question in already_done)
    assert done == [2, 3]
    assert summary["resumed_count"] == 2
    assert summary["count"] == 5
    assert summary["correct"] == 5
    records = read_jsonl(tmp_path / ev.PREDICTIONS_NAME)
    assert [record["id"] for record in records] == [example.id for example in examples]
    assert not (tmp_path / ev.PARTIAL_NAME).exists()
    assert not (tmp_path / ev.PARTIAL_META_NAME).exists()


def test_evaluate_discards_other_partial(smollm2_tokenizer, tmp_path, caplog):
    examples = make_examples(4)
    failing = ScriptedModel(smollm2_tokenizer, replies_for(examples), fail_on_call=2)
    with pytest.raises(RuntimeError):
        ev.evaluate(
            failing,
            smollm2_tokenizer,
            examples,
            ev.GenerationConfig(batch_size=2),
            output_dir=tmp_path,
            metadata=METADATA,
        )

    model = ScriptedModel(smollm2_tokenizer, replies_for(examples))
    with caplog.at_level(logging.INFO, logger="moslora.evaluate"):
        summary = ev.evaluate(
            model,
            smollm2_tokenizer,
            examples,
            ev.GenerationConfig(batch_size=2),
            output_dir=tmp_path,
            metadata={**METADATA, "adapter": "other-adapter"},
        )
    assert sum(call["batch_size"] for call in model.calls) == 4
    assert summary["resumed_count"] == 0
    assert "Discarding the partial results" in caplog.text


def test_evaluate_rereads_cut_partial_line(smollm2_tokenizer, tmp_path):
    examples = make_examples(4)
    failing = ScriptedModel(smollm2_tokenizer, replies_for(examples), fail_on_call=2)
    with pytest.raises(RuntimeError):
        ev.evaluate(
            failing,
            smollm2_tokenizer,
            examples,
            ev.GenerationConfig(batch_size=2),
            output_dir=tmp_path,
            metadata=METADATA,
        )
    # A run killed while appending leaves the last line cut short.
    partial_path = tmp_path / ev.PARTIAL_NAME
    text = partial_path.read_text()
    partial_path.write_text(text[: len(text) - 20])

    model = ScriptedModel(smollm2_tokenizer, replies_for(examples))
    summary = ev.evaluate(
        model,
        smollm2_tokenizer,
        examples,
        ev.GenerationConfig(batch_size=2),
        output_dir=tmp_path,
        metadata=METADATA,
    )
    assert summary["resumed_count"] == 1
    assert sum(call["batch_size"] for call in model.calls) == 3
    assert summary["correct"] == 4
    assert len(read_jsonl(tmp_path / ev.PREDICTIONS_NAME)) == 4


def test_evaluate_failure_keeps_summary(smollm2_tokenizer, tmp_path):
    examples = make_examples(4)
    model = ScriptedModel(smollm2_tokenizer, replies_for(examples))
    config = ev.GenerationConfig(batch_size=2)
    ev.evaluate(model, smollm2_tokenizer, examples, config, output_dir=tmp_path, metadata=METADATA)
    summary_before = (tmp_path / ev.SUMMARY_NAME).read_bytes()
    predictions_before = (tmp_path / ev.PREDICTIONS_NAME).read_bytes()

    failing = ScriptedModel(smollm2_tokenizer, replies_for(examples), fail_on_call=2)
    with pytest.raises(RuntimeError, match="scripted failure"):
        ev.evaluate(
            failing,
            smollm2_tokenizer,
            examples,
            config,
            output_dir=tmp_path,
            metadata={**METADATA, "model": "another"},
        )
    assert (tmp_path / ev.SUMMARY_NAME).read_bytes() == summary_before
    assert (tmp_path / ev.PREDICTIONS_NAME).read_bytes() == predictions_before


def test_evaluate_rejects_invalid_input(smollm2_tokenizer, tmp_path):
    model = ScriptedModel(smollm2_tokenizer, {})
    with pytest.raises(ValueError, match="empty"):
        ev.evaluate(model, smollm2_tokenizer, [], output_dir=tmp_path, metadata={})

    duplicated = make_examples(2) + make_examples(1)
    with pytest.raises(ValueError, match="Duplicate example id 'q0'"):
        ev.evaluate(model, smollm2_tokenizer, duplicated, output_dir=tmp_path, metadata={})

    with pytest.raises(ValueError, match="accuracy"):
        ev.evaluate(
            model,
            smollm2_tokenizer,
            make_examples(1),
            output_dir=tmp_path,
            metadata={"accuracy": 1.0},
        )
    assert model.calls == []


def test_evaluate_tiny_model(tiny_lm, smollm2_tokenizer, tmp_path):
    examples = make_examples(3)
    summary = ev.evaluate(
        tiny_lm,
        smollm2_tokenizer,
        examples,
        ev.GenerationConfig(max_new_tokens=6, batch_size=2),
        output_dir=tmp_path,
        metadata=METADATA,
    )
    records = read_jsonl(tmp_path / ev.PREDICTIONS_NAME)
    assert summary["count"] == 3
    assert [record["id"] for record in records] == ["q0", "q1", "q2"]
    assert all(0 <= record["generated_tokens"] <= 6 for record in records)


# --- the real default model --------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_answers_mawps(data_dir, tmp_path):
    examples = load_examples("mawps", "test", data_dir=data_dir, limit=2)
    model, tokenizer = hub.load_model_and_tokenizer(None, device="cpu")
    summary = ev.evaluate(
        model,
        tokenizer,
        examples,
        ev.GenerationConfig(max_new_tokens=32, batch_size=2),
        output_dir=tmp_path,
        metadata={"dataset": "mawps", "split": "test", "model": hub.DEFAULT_MODEL},
    )
    records = read_jsonl(tmp_path / ev.PREDICTIONS_NAME)
    assert summary["count"] == 2
    assert len(records) == 2
    for record in records:
        assert record["generation"].strip()
        assert 0 < record["generated_tokens"] <= 32


def test_prompt_longer_than_context_rejected(smollm2_tokenizer):
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    settings = ev.GenerationConfig(max_new_tokens=8)
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        ev.generate(model, smollm2_tokenizer, ["word " * 80], settings)


def test_score_dispatches_on_answer_type(data_dir):
    aqua = load_examples("aqua", limit=1)[0]
    assert ev._score(aqua, f"The answer is ({aqua.answer}).", 3)["correct"]
    wrong = "B" if aqua.answer != "B" else "C"
    assert not ev._score(aqua, f"The answer is ({wrong}).", 3)["correct"]
    math = load_examples("math500", limit=1)[0]
    assert ev._score(math, "So $r = 3$ and the point is \\boxed{(3, \\frac{\\pi}{2})}.", 3)[
        "correct"
    ]
    assert not ev._score(math, "\\boxed{(3, \\pi)}", 3)["correct"]
    numeric = load_examples("svamp", limit=1)[0]
    record = ev._score(numeric, f"The answer is {numeric.answer}.", 3)
    assert record["correct"]
    assert record["extracted"] == numeric.answer
