"""The `moslora` command line: train, eval, quickstart, plot and inspect.

Flags are derived from the settings dataclasses (`TrainConfig`, `MoSLoraConfig`, `EvalConfig`,
`GenerationConfig`), so each flag's help text is the field's. `--config FILE.yaml` reads a
recipe whose keys are field names; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moslora.config import MoSLoraConfig, field_help

logger = logging.getLogger("moslora")


@dataclass
class EvalConfig:
    """Settings of one evaluation (every field is also a `moslora eval` flag)."""

    output: str | None = field(
        default=None, metadata=field_help("Folder for summary.json and predictions.jsonl.")
    )
    model: str | None = field(
        default=None,
        metadata=field_help(
            "Base model: local folder or Hub id; default the adapter's base, else SmolLM2."
        ),
    )
    adapter: str | None = field(
        default=None,
        metadata=field_help("Adapter folder written by `moslora train`; none = base model."),
    )
    data: str = field(
        default="mawps", metadata=field_help("Test data: a dataset name, file or folder.")
    )
    split: str = field(default="test", metadata=field_help("Split of --data to evaluate."))
    data_dir: str | None = field(
        default=None, metadata=field_help("Folder of the named datasets; default $MOSLORA_DATA.")
    )
    limit: int | None = field(
        default=None, metadata=field_help("Evaluate only the first N problems.")
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata=field_help(
            "Drop test problems whose question also occurs in these sets, given as NAME:SPLIT "
            "(for example mawps:train); the summary reports how many were dropped."
        ),
    )
    dtype: str = field(
        default="float32", metadata=field_help("Model dtype: float32, bfloat16, float16.")
    )
    progress: bool = field(default=True, metadata=field_help("Show a progress bar."))


# ---- dataclass fields as flags --------------------------------------------------------------

_ADAPTER_SKIP = {"base_model_name_or_path", "init_curvature"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Return the non-None type of an annotation, and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (members[0] if len(members) == 1 else str), True
    return annotation, False


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _target_modules(text: str) -> list[str] | str:
    """Comma-separated names, or a regular expression when the text has regex characters."""
    if any(character in text for character in "*+?[](){}|\\^$"):
        return text
    return _comma_list(text)


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for item in dataclasses.fields(cls):
        if item.name in skip:
            continue
        kind, _ = _base_type(hints[item.name])
        options: dict[str, Any] = {
            "help": item.metadata.get("help", ""),
            "default": argparse.SUPPRESS,
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif item.name == "target_modules":
            options["type"] = _target_modules
            options["metavar"] = "NAMES|REGEX"
        elif typing.get_origin(kind) in (list, tuple):
            options["type"] = _comma_list
            options["metavar"] = "A,B,..."
        elif kind in (int, float, str):
            options["type"] = kind
        else:
            continue
        group.add_argument(_flag(item.name), dest=item.name, **options)


def _load_recipe(path: str, allowed: set[str]) -> dict[str, Any]:
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise FileNotFoundError(f"--config: {recipe_path} not found")
    try:
        data = yaml.safe_load(recipe_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config: {recipe_path} is not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"--config: {recipe_path} must be a mapping of setting names to values")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"--config: {recipe_path} has unknown setting(s) {', '.join(unknown)}; "
            f"settings are the long flag names with '_' for '-'"
        )
    return data


def _split(values: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    parts = []
    for cls in classes:
        names = {item.name for item in dataclasses.fields(cls)}
        parts.append({key: value for key, value in values.items() if key in names})
    return parts


def _settings(args: argparse.Namespace, *classes: type) -> list[dict[str, Any]]:
    given = {
        key: value
        for key, value in vars(args).items()
        if key not in ("command", "config", "verbose")
    }
    allowed = {item.name for cls in classes for item in dataclasses.fields(cls)}
    recipe = {}
    if getattr(args, "config", None):
        raw = _load_recipe(args.config, allowed)
        recipe = {key: _coerce(key, value, classes, args.config) for key, value in raw.items()}
    return _split({**recipe, **given}, *classes)


def _field_type(name: str, classes: tuple[type, ...]) -> Any:
    for cls in classes:
        hints = typing.get_type_hints(cls)
        if name in hints:
            return hints[name]
    raise KeyError(name)


def _coerce(name: str, value: Any, classes: tuple[type, ...], path: str) -> Any:
    """Convert a recipe value to its field's type, as the flag of the same name would.

    YAML reads ``3e-4`` as a string and ``a,b`` as one string, so numbers and comma-separated
    lists given as strings are converted. Any other value of the wrong type is an error.
    """
    kind, optional = _base_type(_field_type(name, classes))
    if value is None and optional:
        return None

    def invalid(expected: str) -> ValueError:
        return ValueError(f"--config: {path}: {name} must be {expected}, got {value!r}")

    if name == "target_modules":
        if isinstance(value, str):
            return _target_modules(value)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise invalid("a list of module names or a regular expression")
    if name == "init_curvature":
        if isinstance(value, str):
            return _parse_curvatures(value)
        if isinstance(value, dict):
            return value
        raise invalid("a mapping of expert kind to curvature")
    if name == "router_groups":
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise invalid("true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise invalid(f"a number ({kind.__name__})")
        if isinstance(value, (int, float)) and (kind is float or isinstance(value, int)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
        raise invalid(f"a number ({kind.__name__})")
    if typing.get_origin(kind) in (list, tuple):
        if isinstance(value, str):
            return _comma_list(value)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise invalid("a list of strings")
    if kind is str:
        if isinstance(value, str):
            return value
        raise invalid("a string")
    return value


def _parse_curvatures(text: str) -> dict[str, float]:
    result = {}
    for part in _comma_list(text):
        kind, separator, value = part.partition("=")
        if not separator:
            raise argparse.ArgumentTypeError(
                f"expected KIND=VALUE pairs such as hyperbolic=-0.5, got {part!r}"
            )
        try:
            result[kind.strip()] = float(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{part!r}: {value!r} is not a number") from error
    return result


# ---- commands -------------------------------------------------------------------------------


def _command_train(args: argparse.Namespace) -> int:
    from moslora.methods import adapter_config_for
    from moslora.train import TrainConfig, train

    train_values, adapter_values = _settings(args, TrainConfig, MoSLoraConfig)
    train_config = TrainConfig(**train_values)
    train_config.validate()
    try:
        adapter_config = adapter_config_for(
            train_config.method, adapter_values, total_rank=train_config.total_rank
        )
    except ValueError as error:
        if args.config:
            source = f"settings from the command line and {args.config}"
            raise ValueError(f"{error} ({source})") from None
        raise
    if train_config.total_rank is not None:
        logger.info(
            "--total-rank %d: rank %d and lora_alpha %g per expert",
            train_config.total_rank,
            adapter_config.r,
            adapter_config.lora_alpha,
        )
    record = train(train_config, adapter_config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output": train_config.output, **record["metrics"]}, indent=2))
    return 0


def _load_for_eval(config: EvalConfig):
    from moslora.hub import load_model_and_tokenizer
    from moslora.methods import load_trained_adapter, read_adapter_config

    model_name = config.model
    if config.adapter is not None and model_name is None:
        model_name = read_adapter_config(config.adapter).base_model_name_or_path
        try:
            model, tokenizer = load_model_and_tokenizer(model_name, dtype=config.dtype)
        except OSError as error:
            raise OSError(
                f"the base model recorded in {config.adapter}, {model_name!r}, could not be "
                f"loaded ({error}); pass --model with the folder or Hub id it was trained on"
            ) from error
    else:
        model, tokenizer = load_model_and_tokenizer(model_name, dtype=config.dtype)
    if config.adapter is not None:
        model = load_trained_adapter(model, config.adapter)
    return model, tokenizer, model_name


def run_eval(config: EvalConfig, generation, *, loaded=None) -> dict[str, Any]:
    """Evaluate a base model, or a base model with an adapter, and write the result folder."""
    from moslora.data import drop_overlap, load_examples
    from moslora.evaluate import evaluate
    from moslora.hub import DEFAULT_MODEL

    if not config.output:
        raise ValueError("--output is required: the folder for summary.json and predictions.jsonl")
    examples = load_examples(config.data, config.split, data_dir=config.data_dir)
    dropped = {}
    for spec in config.exclude:
        name, _, split = spec.partition(":")
        reference = load_examples(name, split or "train", data_dir=config.data_dir)
        examples, count = drop_overlap(examples, reference)
        dropped[spec] = count
    if config.limit is not None:
        if config.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {config.limit}")
        examples = examples[: config.limit]
    model, tokenizer, model_name = loaded or _load_for_eval(config)
    progress_bar = None
    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress_bar = tqdm(
            total=len(examples), desc=f"eval {config.data}:{config.split}", unit="problem"
        )
        progress = progress_bar.update
    metadata = {
        "dataset": config.data,
        "split": config.split,
        "model": model_name or DEFAULT_MODEL,
        "adapter": config.adapter,
        "dtype": config.dtype,
        "limit": config.limit,
        "excluded_overlap": dropped,
    }
    try:
        summary = evaluate(
            model,
            tokenizer,
            examples,
            generation,
            output_dir=Path(config.output),
            metadata=metadata,
            progress=progress,
        )
    finally:
        if progress_bar is not None:
            progress_bar.close()
    return summary


def _command_eval(args: argparse.Namespace) -> int:
    from moslora.evaluate import GenerationConfig

    eval_values, generation_values = _settings(args, EvalConfig, GenerationConfig)
    summary = run_eval(EvalConfig(**eval_values), GenerationConfig(**generation_values))
    _print_accuracy(summary)
    return 0


def _print_accuracy(summary: dict[str, Any], label: str = "") -> None:
    name = label or ("adapter " + summary["adapter"] if summary.get("adapter") else "base model")
    print(
        f"{name}: accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['count']}) "
        f"on {summary['dataset']}:{summary['split']}"
    )


def _command_quickstart(args: argparse.Namespace) -> int:
    """Evaluate the base model, fine-tune it, evaluate the result, print both accuracies."""
    from moslora.evaluate import GenerationConfig
    from moslora.train import TrainConfig, train

    output = Path(args.output)
    started = time.monotonic()
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size
    )
    if args.test_limit < 1:
        raise ValueError(f"--test-limit must be at least 1, got {args.test_limit}")
    if args.train_limit < 1:
        raise ValueError(f"--train-limit must be at least 1, got {args.train_limit}")
    if not args.epochs > 0:
        raise ValueError(f"--epochs must be above 0, got {args.epochs}")
    test = {"data": "mawps", "split": "test", "limit": args.test_limit, "exclude": ["mawps:train"]}
    # Every setting is checked before the first evaluation, which takes minutes.
    train_config = TrainConfig(
        output=str(output / "adapter"),
        data="mawps",
        limit=args.train_limit,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        overwrite=True,
        save_steps=1000,
    )
    train_config.validate()
    adapter_config = MoSLoraConfig(r=args.r)
    base_summary = run_eval(EvalConfig(output=str(output / "eval-base"), **test), generation)
    train(train_config, adapter_config)
    tuned_summary = run_eval(
        EvalConfig(output=str(output / "eval-tuned"), adapter=str(output / "adapter"), **test),
        generation,
    )
    minutes = (time.monotonic() - started) / 60
    print()
    print(f"MAWPS test problems (training questions removed), first {base_summary['count']}:")
    _print_accuracy(base_summary, "base model  ")
    _print_accuracy(tuned_summary, "fine-tuned  ")
    print(f"results in {output}; total time {minutes:.1f} min")
    return 0


def _command_plot(args: argparse.Namespace) -> int:
    from moslora.plot import plot_run

    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0


def _command_inspect(args: argparse.Namespace) -> int:
    from moslora.diagnostics import inspect_adapter

    print(inspect_adapter(args.adapter_dir, args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moslora.evaluate import GenerationConfig
    from moslora.train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="moslora",
        description="Fine-tune causal language models with Mixture-of-Space LoRA adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="Fine-tune a model with a MoSLoRA adapter.")
    train_parser.add_argument("--config", help="YAML recipe of settings; flags override it.")
    _add_fields(train_parser, TrainConfig)
    _add_fields(train_parser, MoSLoraConfig, skip=_ADAPTER_SKIP)
    train_parser.add_argument(
        "--init-curvature",
        type=_parse_curvatures,
        default=argparse.SUPPRESS,
        metavar="KIND=K,...",
        help="Initial curvature per kind, e.g. hyperbolic=-0.5,spherical=0.5.",
    )
    train_parser.set_defaults(handler=_command_train)

    eval_parser = commands.add_parser("eval", help="Evaluate a model, with or without an adapter.")
    eval_parser.add_argument("--config", help="YAML recipe of settings; flags override it.")
    _add_fields(eval_parser, EvalConfig)
    _add_fields(eval_parser, GenerationConfig)
    eval_parser.set_defaults(handler=_command_eval)

    quick = commands.add_parser(
        "quickstart",
        help="Evaluate SmolLM2 on MAWPS, fine-tune it on a MAWPS subset, evaluate it again.",
    )
    quick.add_argument("--output", default="runs/quickstart", help="Folder for all results.")
    quick.add_argument("--train-limit", type=int, default=320, help="MAWPS training examples.")
    quick.add_argument("--test-limit", type=int, default=100, help="MAWPS test problems.")
    quick.add_argument("--epochs", type=float, default=1.0, help="Passes over the training set.")
    quick.add_argument("--batch-size", type=int, default=8, help="Training batch size.")
    quick.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate.")
    quick.add_argument("--r", type=int, default=8, help="Rank of each of the three experts.")
    quick.add_argument(
        "--max-new-tokens", type=int, default=96, help="Generation limit per problem."
    )
    quick.add_argument(
        "--eval-batch-size", type=int, default=25, help="Problems generated together."
    )
    quick.set_defaults(handler=_command_quickstart)

    plot = commands.add_parser(
        "plot", help="Draw curvature, expert-usage and loss figures of a training run as PNGs."
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="Run folder written by `moslora train`.")
    plot.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="Folder for the PNGs; default RUN_DIR/figures.",
    )
    plot.set_defaults(handler=_command_plot)

    inspect = commands.add_parser(
        "inspect",
        help="Print each expert's kind, curvature and mean router probability of a saved adapter.",
    )
    inspect.add_argument(
        "adapter_dir", metavar="ADAPTER_DIR", help="Adapter folder written by `moslora train`."
    )
    inspect.add_argument(
        "--format", choices=("table", "json"), default="table", help="Output: a text table or JSON."
    )
    inspect.set_defaults(handler=_command_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # PEFT 0.21 calls this transformers 5 method on every LoRA and DoRA model; the warning is
    # not about anything the user did.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    try:
        return args.handler(args)
    except BrokenPipeError:
        # The reader of stdout (for example `head`) closed it early: stop quietly, as Unix tools
        # do, and keep Python from reporting the failed flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        print(f"moslora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moslora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
