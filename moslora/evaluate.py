"""Batched greedy generation and accuracy scoring on math word problems.

:func:`evaluate` writes ``predictions.jsonl`` and ``summary.json`` into an output folder. Both
are written to temporary files and renamed into place, so an interrupted run never leaves a
half-written result. Progress is appended to ``predictions.partial.jsonl`` after every batch,
and a later call with the same metadata, settings and problems resumes from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from moslora.answers import extract_answer, is_correct
from moslora.config import field_help
from moslora.data import Example, build_prompt
from moslora.files import write_json_atomic, write_text_atomic
from moslora.math_answers import (
    extract_choice,
    extract_latex_answer,
    latex_equivalent,
    parse_choices,
)

logger = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.jsonl"
SUMMARY_NAME = "summary.json"
PARTIAL_NAME = "predictions.partial.jsonl"
PARTIAL_META_NAME = "partial.meta.json"

# Text that starts a new problem or turn instead of continuing the answer: runs of blank lines
# and the markers of the Alpaca and question/answer prompt formats.
DEFAULT_STOP_STRINGS = ("\n\n\n", "Question:", "### Instruction")

# Summary keys computed by evaluate(). Metadata may not use them.
_SUMMARY_KEYS = (
    "accuracy",
    "correct",
    "count",
    "generation",
    "generated_tokens",
    "wall_time_s",
    "resumed_count",
    "date",
)


@dataclass
class GenerationConfig:
    """Settings of batched generation. Decoding is greedy (no sampling)."""

    max_new_tokens: int = field(
        default=256, metadata=field_help("Maximum number of tokens generated per problem.")
    )
    batch_size: int = field(
        default=16, metadata=field_help("Number of prompts generated together in one batch.")
    )
    stop_strings: tuple[str, ...] = field(
        default=DEFAULT_STOP_STRINGS,
        metadata=field_help(
            "Strings that end a generation. Generation stops once one appears, and the text is "
            "cut before the first of them. An empty list disables them."
        ),
    )
    num_beams: int = field(
        default=1,
        metadata=field_help("Number of beams: 1 is greedy decoding, more is beam search."),
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        for name, flag in (
            ("max_new_tokens", "--max-new-tokens"),
            ("batch_size", "--batch-size"),
            ("num_beams", "--num-beams"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {flag} {value!r}: expected an integer of at least 1.")
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValueError(
                    f"Invalid --stop-strings entry {stop!r}: expected a non-empty string."
                )


# ---------------------------------------------------------------------------------------------
# Generation


def _add_special_tokens(tokenizer: Any) -> bool:
    # A chat template already writes the special tokens (such as BOS) into the prompt text.
    return not getattr(tokenizer, "chat_template", None)


@contextlib.contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    """Pad on the left while generating, so every prompt ends where generation starts."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _length_sorted_batches(
    tokenizer: Any, prompts: Sequence[str], batch_size: int
) -> list[list[int]]:
    """Group prompt indices into batches of similar token length, longest first.

    Similar lengths need less padding, and the longest batch comes first so that running out
    of memory shows at once.
    """
    encoded = tokenizer(list(prompts), add_special_tokens=_add_special_tokens(tokenizer))
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Return the ids of the EOS and pad tokens, which end a generated sequence."""
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(configured)
    ids.discard(None)
    return ids


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Return ``text`` up to the earliest occurrence of any stop string."""
    end = len(text)
    for stop in stop_strings:
        position = text.find(stop)
        if position != -1:
            end = min(end, position)
    return text[:end]


def _check_context(
    model: Any, attention_mask: torch.Tensor, prompts: list[str], max_new_tokens: int
) -> None:
    """Raise ValueError when a prompt plus the generated tokens exceeds the model's context."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int):
        return
    lengths = attention_mask.sum(dim=-1).tolist()
    for prompt, length in zip(prompts, lengths, strict=True):
        if length + max_new_tokens > context:
            raise ValueError(
                f"a prompt of {length} tokens plus --max-new-tokens {max_new_tokens} exceeds the "
                f"model's context of {context} tokens (prompt starts {prompt[:80]!r}); lower "
                "--max-new-tokens or shorten the problem"
            )


def _generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], config: GenerationConfig
) -> list[tuple[str, int]]:
    """Generate for one batch of prompts. The tokenizer must already pad on the left.

    Returns each generation's text, cut at the stop strings and stripped, and the number of
    tokens generated before the first EOS or pad token.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token, so prompts cannot be batched. Set one, for "
            "example tokenizer.pad_token = tokenizer.eos_token."
        )
    encoded = tokenizer(
        prompts,
        padding=True,
        return_tensors="pt",
        add_special_tokens=_add_special_tokens(tokenizer),
    )
    _check_context(model, encoded["attention_mask"], prompts, config.max_new_tokens)
    device = _model_device(model)
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    options: dict[str, Any] = {
        "do_sample": False,
        "num_beams": config.num_beams,
        "max_new_tokens": config.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if config.stop_strings:
        options["stop_strings"] = list(config.stop_strings)
        options["tokenizer"] = tokenizer
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    sequences = getattr(output, "sequences", output)
    # (batch, new tokens): left padding makes every prompt end at column input_ids.shape[1].
    new_tokens = sequences[:, input_ids.shape[1] :].tolist()

    end_ids = _end_token_ids(model, tokenizer)
    results = []
    for tokens in new_tokens:
        count = next(
            (position for position, token in enumerate(tokens) if token in end_ids), len(tokens)
        )
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        results.append((cut_at_stop_strings(text, config.stop_strings).strip(), count))
    return results


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    config: GenerationConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Generate a completion for each prompt with batched greedy (or beam) decoding.

    ``model`` is a transformers model or any wrapper whose ``generate(**kwargs)`` accepts the
    transformers arguments. Prompts are batched by token length with left padding, and the
    completions are returned in the order of ``prompts``, each cut before its first stop
    string and stripped of surrounding whitespace. ``progress`` is called after each batch
    with the number of prompts it completed.
    """
    config = config or GenerationConfig()
    texts = [""] * len(prompts)
    if not prompts:
        return texts
    with _left_padding(tokenizer):
        for batch in _length_sorted_batches(tokenizer, prompts, config.batch_size):
            outputs = _generate_batch(model, tokenizer, [prompts[i] for i in batch], config)
            for index, (text, _) in zip(batch, outputs, strict=True):
                texts[index] = text
            if progress is not None:
                progress(len(batch))
    return texts


# ---------------------------------------------------------------------------------------------
# Partial progress


def _run_key(
    metadata: dict[str, Any], config: GenerationConfig, prompts: list[str], examples: list[Example]
) -> dict[str, Any]:
    """Identify an evaluation run, so that only a partial file of the same run is resumed.

    The batch size is left out because it changes the generations only through floating-point
    rounding, and resuming with a smaller batch after running out of memory should work.
    """
    generation = asdict(config)
    del generation["batch_size"]
    digest = hashlib.sha256()
    for example, prompt in zip(examples, prompts, strict=True):
        digest.update(json.dumps([example.id, prompt, example.answer]).encode("utf-8"))
    return _json_copy(
        {"metadata": metadata, "generation": generation, "problems_sha256": digest.hexdigest()}
    )


def _json_copy(value: Any) -> Any:
    """Return ``value`` as it reads back from JSON, with unknown types written as strings."""
    return json.loads(json.dumps(value, default=str))


def _remove_partial(output_dir: Path) -> None:
    for name in (PARTIAL_NAME, PARTIAL_META_NAME):
        with contextlib.suppress(FileNotFoundError):
            (output_dir / name).unlink()


_RECORD_KEYS = {"id", "question", "gold", "generation", "extracted", "correct", "generated_tokens"}


def _read_partial_records(path: Path, expected_ids: set[str]) -> dict[str, dict[str, Any]]:
    """Read the complete records of a partial file. A killed run may leave a cut last line."""
    records: dict[str, dict[str, Any]] = {}
    skipped = 0
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(record, dict) or not _RECORD_KEYS <= record.keys():
                skipped += 1
                continue
            if record["id"] in expected_ids:
                records[record["id"]] = record
    if skipped:
        logger.warning(
            "Skipped %d unreadable lines of %s, so those problems run again", skipped, path
        )
    return records


def _restore_partial(
    output_dir: Path, run_key: dict[str, Any], examples: list[Example]
) -> dict[str, dict[str, Any]]:
    """Return the records of an earlier, interrupted run of the same evaluation.

    Partial files of a different run are deleted. The kept records are written back without
    any cut line, so that new records can be appended after them.
    """
    meta_path = output_dir / PARTIAL_META_NAME
    partial_path = output_dir / PARTIAL_NAME
    try:
        stored_key = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        stored_key = None
    except ValueError:
        logger.warning("Ignoring the unreadable %s", meta_path)
        stored_key = None

    if stored_key != run_key:
        if stored_key is not None or partial_path.exists():
            logger.info(
                "Discarding the partial results in %s: they come from a run with other "
                "metadata, settings or problems",
                output_dir,
            )
        _remove_partial(output_dir)
        write_json_atomic(meta_path, run_key)
        return {}

    records = _read_partial_records(partial_path, {example.id for example in examples})
    ordered = [records[example.id] for example in examples if example.id in records]
    write_text_atomic(partial_path, "".join(_record_line(record) for record in ordered))
    return records


# ---------------------------------------------------------------------------------------------
# Scoring and results


def _record_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _score(example: Example, generation: str, generated_tokens: int) -> dict[str, Any]:
    if example.answer_type == "choice":
        extracted = extract_choice(generation, parse_choices(example.question))
        correct = extracted == example.answer
    elif example.answer_type == "latex":
        extracted = extract_latex_answer(generation)
        correct = extracted is not None and latex_equivalent(extracted, str(example.answer))
    else:
        extracted = extract_answer(generation)
        correct = is_correct(extracted, example.answer)
        if extracted is not None and not math.isfinite(extracted):
            # JSON has no infinity. A number too large for a float is scored wrong either way.
            extracted = None
    return {
        "id": example.id,
        "question": example.question,
        "gold": example.answer,
        "generation": generation,
        "extracted": extracted,
        "correct": correct,
        "generated_tokens": generated_tokens,
    }


def _check_examples(examples: list[Example]) -> None:
    if not examples:
        raise ValueError("No examples to evaluate: the list of examples is empty.")
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise ValueError(
                f"Duplicate example id {example.id!r} ({example.source}): evaluation needs "
                "unique ids to write one prediction per problem and to resume."
            )
        seen.add(example.id)


def _check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    clashes = sorted(set(metadata) & set(_SUMMARY_KEYS))
    if clashes:
        raise ValueError(
            f"Metadata keys {clashes} clash with the summary keys that evaluate() computes. "
            "Rename them."
        )
    return _json_copy(metadata)


def _summarize(
    records: list[dict[str, Any]],
    metadata: dict[str, Any],
    config: GenerationConfig,
    wall_time: float,
    resumed_count: int,
) -> dict[str, Any]:
    correct = sum(1 for record in records if record["correct"])
    return {
        "accuracy": correct / len(records),
        "correct": correct,
        "count": len(records),
        **metadata,
        "generation": _json_copy(asdict(config)),
        "generated_tokens": sum(record["generated_tokens"] for record in records),
        "wall_time_s": round(wall_time, 3),
        "resumed_count": resumed_count,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    config: GenerationConfig | None = None,
    *,
    output_dir: str | os.PathLike,
    metadata: dict[str, Any],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate an answer for every example, score it, and write the results to ``output_dir``.

    ``predictions.jsonl`` gets one line per example, in the order of ``examples``, with the
    keys id, question, gold, generation, extracted, correct and generated_tokens.
    ``summary.json`` gets accuracy, correct and count, every ``metadata`` entry, the
    generation settings, the number of generated tokens, the wall time in seconds of this call,
    the number of problems restored from a partial file, and the UTC date. Returns the summary.

    After every batch the new records are appended to ``predictions.partial.jsonl``. A call
    whose metadata, settings (except the batch size) and problems match those stored in
    ``partial.meta.json`` skips the problems that are already in it. ``progress`` is called
    with the number of problems completed: once for those restored, then after each batch.

    Raises ValueError for an empty list, duplicate example ids, or metadata keys that clash
    with the computed summary keys.
    """
    config = config or GenerationConfig()
    _check_examples(examples)
    metadata = _check_metadata(metadata)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    prompts = [build_prompt(example.question, tokenizer) for example in examples]
    run_key = _run_key(metadata, config, prompts, examples)
    records = _restore_partial(output_dir, run_key, examples)
    resumed_count = len(records)
    if resumed_count:
        logger.info(
            "Resuming the evaluation in %s: %d of %d problems are already done",
            output_dir,
            resumed_count,
            len(examples),
        )
        if progress is not None:
            progress(resumed_count)

    remaining = [index for index, example in enumerate(examples) if example.id not in records]
    started = time.perf_counter()
    if remaining:
        remaining_prompts = [prompts[index] for index in remaining]
        with (
            _left_padding(tokenizer),
            (output_dir / PARTIAL_NAME).open("a", encoding="utf-8") as partial,
        ):
            batches = _length_sorted_batches(tokenizer, remaining_prompts, config.batch_size)
            for batch in batches:
                batch_prompts = [remaining_prompts[position] for position in batch]
                outputs = _generate_batch(model, tokenizer, batch_prompts, config)
                for position, (text, count) in zip(batch, outputs, strict=True):
                    record = _score(examples[remaining[position]], text, count)
                    records[record["id"]] = record
                    partial.write(_record_line(record))
                partial.flush()
                os.fsync(partial.fileno())
                if progress is not None:
                    progress(len(batch))
    wall_time = time.perf_counter() - started

    ordered = [records[example.id] for example in examples]
    summary = _summarize(ordered, metadata, config, wall_time, resumed_count)
    write_text_atomic(output_dir / PREDICTIONS_NAME, "".join(map(_record_line, ordered)))
    write_json_atomic(output_dir / SUMMARY_NAME, summary)
    _remove_partial(output_dir)
    logger.info(
        "Accuracy %.4f (%d of %d) written to %s",
        summary["accuracy"],
        summary["correct"],
        summary["count"],
        output_dir,
    )
    return summary
