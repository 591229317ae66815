"""Train and evaluate every fine-tuning method the same way, then tabulate the results.

Each method trains from its recipe in ``configs/methods`` with the same data, seed, steps and
summed rank, through ``moslora train``; each result is evaluated with ``moslora eval`` on the
same problems. Runs go one at a time, and a run or evaluation that has already finished is
skipped, so the comparison can be built in stages on a small machine and merged::

    python benchmarks/compare.py run --methods base,lora,moslora --seeds 1,2
    python benchmarks/compare.py run --methods dora,hyplora --seeds 1
    python benchmarks/compare.py report

``run`` adds each finished run to the results JSON (``--results``) under a file lock, so jobs
that run at the same time may share one file. ``report`` merges one or more such files into a
Markdown table with the command, machine and date, and writes it into ``--doc``
between the markers ``<!-- compare:<name>:begin -->`` and ``<!-- compare:<name>:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from moslora.files import write_json_atomic, write_text_atomic
from moslora.train import last_complete_checkpoint, machine_description

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "methods"
METHODS = ("base", "lora", "dora", "hyplora", "euclidean", "hyperbolic", "spherical", "moslora")
# The command that made a run's adapter, and each evaluation folder's, as a JSON list.
TRAIN_COMMAND_NAME = "train-command.json"
EVAL_COMMAND_NAME = "eval-command.json"
DEFAULT_EVAL = "mawps:test:100,svamp:test:60,gsm8k:test:30"


def parse_eval_specs(text: str) -> list[dict[str, Any]]:
    """Parse ``NAME:SPLIT[:LIMIT],...`` into evaluation settings."""
    specs = []
    for part in (item.strip() for item in text.split(",")):
        if not part:
            continue
        pieces = part.split(":")
        if len(pieces) not in (2, 3) or not all(pieces):
            raise ValueError(f"--eval: {part!r} is not NAME:SPLIT or NAME:SPLIT:LIMIT")
        limit = None
        if len(pieces) == 3:
            if not pieces[2].isdigit() or int(pieces[2]) < 1:
                raise ValueError(f"--eval: the limit in {part!r} must be a positive integer")
            limit = int(pieces[2])
        specs.append({"name": pieces[0], "split": pieces[1], "limit": limit, "key": part})
    if not specs:
        raise ValueError("--eval lists no evaluation set")
    return specs


def check_eval_data(specs: list[dict[str, Any]], exclude: str) -> None:
    """Load every evaluation set once, so a wrong name or split fails before any training."""
    from moslora.data import load_examples

    for name, split in [(spec["name"], spec["split"]) for spec in specs] + [
        tuple((exclude.split(":") + ["train"])[:2])
    ]:
        try:
            load_examples(name, split)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"--eval/--exclude {name}:{split}: {error}") from error


def run_name(method: str, seed: int, lr: float | None) -> str:
    if method == "base":
        return "base"
    return f"{method}-lr{lr:g}-s{seed}" if lr is not None else f"{method}-s{seed}"


def _moslora(*args: str) -> list[str]:
    return [sys.executable, "-m", "moslora.cli", *args]


def _run(command: list[str], log: Path) -> float:
    """Run one command, teeing its output to ``log``; return its wall time in seconds."""
    print("+", shlex.join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("a") as handle:
        handle.write(f"+ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if process.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(
            f"command failed with exit code {process.returncode}: {shlex.join(command)}\n"
            f"last lines of {log}:\n{tail}"
        )
    return time.monotonic() - started


def _check_command(path: Path, command: list[str]) -> None:
    """Record the command that fills a folder, or reject a folder filled by another command.

    A finished folder is only reused by the same command, so a results entry never describes
    settings its run did not use. The interpreter path is left out of the comparison.
    """
    arguments = command[1:]
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != arguments:
            raise RuntimeError(
                f"{path.parent} was made by another command:\n  {shlex.join(recorded)}\n"
                f"not:\n  {shlex.join(arguments)}\nuse another --runs folder, or remove "
                f"{path.parent} to redo it with the new settings"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arguments) + "\n")


def _finished_training(folder: Path) -> dict[str, Any] | None:
    path = folder / "run_config.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("finished") else None


def _machine() -> dict[str, Any]:
    import torch

    return {**machine_description(), "torch": torch.__version__}


def _load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"runs": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from error
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise ValueError(f'{path} has no "runs" mapping; it was not written by this script')
    for name, entry in data["runs"].items():
        _check_entry(path, name, entry)
    return data


def _check_entry(path: Path, name: str, entry: Any) -> None:
    def invalid(what: str) -> ValueError:
        return ValueError(f"{path}: run {name!r}: {what}; fix or remove that entry")

    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise invalid('expected a mapping with a "method" name')
    evaluations = entry.get("eval")
    if not isinstance(evaluations, dict):
        raise invalid('"eval" must map evaluation sets to results')
    for key, result in evaluations.items():
        if not isinstance(result, dict):
            raise invalid(f"{key}: expected a mapping of accuracy, correct and count")
        numbers = [result.get(field) for field in ("accuracy", "correct", "count")]
        if not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in numbers
        ):
            raise invalid(f"{key}: accuracy, correct and count must be numbers")


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock beside ``path`` while a job reads, updates and writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _save_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# Methods without learning-rate runs of their own on the selection set take the choice of
# their closest relative: DoRA that of LoRA, the single-space experts that of the mixture.
LR_FALLBACK = {
    "dora": "lora",
    "hyplora": "moslora",
    "euclidean": "moslora",
    "hyperbolic": "moslora",
    "spherical": "moslora",
}


def select_learning_rates(path: Path, key: str | None = None) -> dict[str, float]:
    """Pick each method's learning rate as the one with the best accuracy in a results file.

    The file contains runs of a selection set (``mawps:valid``, never a test set). Accuracy is
    averaged over seeds; a tie goes to the larger learning rate. ``key`` names the evaluation
    set when the runs have several.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--lr-from {path} not found; run the selection runs first")
    data = _load_results(path)
    best: dict[str, tuple[float, float]] = {}
    for row in aggregate(data["runs"]):
        if row["method"] == "base" or row["lr"] is None:
            continue
        keys = [key] if key else sorted(row["accuracy"])
        if len(keys) != 1 or keys[0] not in row["accuracy"]:
            raise ValueError(
                f"{path}: runs of {row['method']} have evaluation sets {sorted(row['accuracy'])}; "
                "select with one of them"
            )
        if keys[0].split(":")[1] == "test":
            raise ValueError(
                f"{path}: learning rates would be chosen on the test split {keys[0]}; select "
                "them on a validation split such as mawps:valid"
            )
        score = (row["accuracy"][keys[0]]["mean"], row["lr"])
        if row["method"] not in best or score > best[row["method"]]:
            best[row["method"]] = score
    chosen = {method: score[1] for method, score in best.items()}
    for method, relative in LR_FALLBACK.items():
        if method not in chosen and relative in chosen:
            chosen[method] = chosen[relative]
    return chosen


def learning_rate(args: argparse.Namespace, method: str) -> float | None:
    if method == "base":
        return None
    if args.lr_from:
        chosen = select_learning_rates(Path(args.lr_from))
        if method not in chosen:
            raise ValueError(
                f"--lr-from {args.lr_from} has no runs of {method} or of its fallback "
                f"{LR_FALLBACK.get(method, '-')}; run the selection for it first"
            )
        return chosen[method]
    return args.lr


def run_one(args: argparse.Namespace, method: str, seed: int, specs: list[dict]) -> dict:
    """Train (unless ``method`` is base) and evaluate one run; return its results entry."""
    lr = learning_rate(args, method)
    folder = Path(args.runs) / run_name(method, seed, lr)
    entry: dict[str, Any] = {"method": method, "seed": None if method == "base" else seed}
    commands = []
    if method != "base":
        command, record = _train(args, method, seed, lr, folder)
        commands.append(shlex.join(command))
        entry.update(
            lr=record["train"]["lr"],
            trainable_parameters=record["trainable_parameters"],
            total_parameters=record["total_parameters"],
            train_examples=record["examples"],
            adapter=record["adapter"],
            throughput=record.get("throughput"),
            curvature_by_kind=_final_curvature_by_kind(record),
        )

    entry["eval"] = {}
    for spec in specs:
        command, summary = _evaluate(args, spec, folder, with_adapter=method != "base")
        commands.append(shlex.join(command))
        entry["eval"][spec["key"]] = {
            "accuracy": summary["accuracy"],
            "correct": summary["correct"],
            "count": summary["count"],
            "excluded_overlap": summary.get("excluded_overlap", {}),
            "wall_seconds": summary.get("wall_seconds"),
        }
    entry["commands"] = commands
    entry["machine"] = _machine()
    entry["date"] = datetime.date.today().isoformat()
    return entry


def _model_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model] if args.model else []


def _train(
    args: argparse.Namespace, method: str, seed: int, lr: float | None, folder: Path
) -> tuple[list[str], dict[str, Any]]:
    """Train one run unless it has finished; return the command and the run record."""
    command = _moslora(
        "train",
        "--config", str(RECIPES / f"{method}.yaml"),
        "--method", method,
        "--seed", str(seed),
        "--output", str(folder / "adapter"),
        "--limit", str(args.train_limit),
        "--epochs", str(args.epochs),
        "--no-progress",
        *_model_flags(args),
        *(["--lr", str(lr)] if lr is not None else []),
        *shlex.split(args.train_args),
    )  # fmt: skip
    _check_command(folder / TRAIN_COMMAND_NAME, command)
    record = _finished_training(folder / "adapter")
    if record is not None:
        return command, record
    run_command = list(command)
    if last_complete_checkpoint(folder / "adapter" / "checkpoints") is not None:
        run_command.append("--resume")
    _run(run_command, folder / "commands.log")
    record = _finished_training(folder / "adapter")
    if record is None:
        raise RuntimeError(f"{folder / 'adapter'}: training ended without a finished run")
    return command, record


def _evaluate(
    args: argparse.Namespace, spec: dict[str, Any], folder: Path, *, with_adapter: bool
) -> tuple[list[str], dict[str, Any]]:
    """Evaluate one run on one set unless that is done; return the command and the summary."""
    out = folder / f"eval-{spec['name']}-{spec['split']}-{spec['limit'] or 'all'}"
    command = _moslora(
        "eval",
        "--data", spec["name"],
        "--split", spec["split"],
        "--exclude", args.exclude,
        "--output", str(out),
        "--max-new-tokens", str(args.max_new_tokens),
        "--batch-size", str(args.eval_batch_size),
        "--no-progress",
        *_model_flags(args),
        *(["--limit", str(spec["limit"])] if spec["limit"] else []),
        *(["--adapter", str(folder / "adapter")] if with_adapter else []),
    )  # fmt: skip
    _check_command(out / EVAL_COMMAND_NAME, command)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return command, json.loads(summary_path.read_text())
    seconds = _run(command, folder / "commands.log")
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = seconds
    write_json_atomic(summary_path, summary)
    return command, summary


def _final_curvature_by_kind(record: dict[str, Any]) -> dict[str, float]:
    logged = [item for item in record.get("log_history", []) if "loss" in item]
    if not logged:
        return {}
    last = logged[-1]
    return {
        key[len("curvature_") :]: value
        for key, value in last.items()
        if key.startswith("curvature_") and key != "curvature_lr"
    }


def command_run(args: argparse.Namespace) -> int:
    methods = [item.strip() for item in args.methods.split(",") if item.strip()]
    if not methods:
        raise ValueError(f"--methods lists no method; choose from {', '.join(METHODS)}")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from {METHODS}")
    try:
        seeds = [int(item) for item in args.seeds.split(",") if item.strip()]
    except ValueError as error:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from error
    if not seeds:
        raise ValueError("--seeds lists no seed")
    if args.train_limit < 1:
        raise ValueError(f"--train-limit must be at least 1, got {args.train_limit}")
    if args.lr is not None and args.lr_from:
        raise ValueError("give --lr or --lr-from, not both")
    for method in methods:
        learning_rate(args, method)  # a missing selection fails before any training
    specs = parse_eval_specs(args.eval)
    check_eval_data(specs, args.exclude)
    results_path = Path(args.results)
    _load_results(results_path)  # a damaged file fails before hours of training
    settings = {
        "train_limit": args.train_limit,
        "epochs": args.epochs,
        "train_args": args.train_args,
        "eval": args.eval,
        "exclude": args.exclude,
        "max_new_tokens": args.max_new_tokens,
        "model": args.model,
        "lr_from": args.lr_from,
    }
    for method in methods:
        for seed in seeds if method != "base" else seeds[:1]:
            entry = run_one(args, method, seed, specs)
            entry["settings"] = settings
            name = run_name(method, seed, learning_rate(args, method))
            with _locked(results_path):
                data = _load_results(results_path)
                data["runs"][name] = entry
                _save_results(results_path, data)
            print(f"{name}: {_eval_line(entry)}", flush=True)
    return 0


def _eval_line(entry: dict[str, Any]) -> str:
    return ", ".join(
        f"{key} {value['correct']}/{value['count']}" for key, value in entry["eval"].items()
    )


# ---- the report -----------------------------------------------------------------------------


def _standard_error(accuracy: float, count: int) -> float:
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / count) if count else float("nan")


def aggregate(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by method and learning rate; mean and spread of accuracy over seeds."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for entry in runs.values():
        groups.setdefault((entry["method"], entry.get("lr")), []).append(entry)
    rows = []
    for (method, lr), entries in groups.items():
        entries.sort(key=lambda entry: entry["seed"] or 0)
        sets = sorted({key for entry in entries for key in entry["eval"]})
        accuracy = {}
        for key in sets:
            values = [entry["eval"][key] for entry in entries if key in entry["eval"]]
            scores = [value["accuracy"] for value in values]
            count = values[0]["count"]
            accuracy[key] = {
                "mean": statistics.fmean(scores),
                "seeds": scores,
                "spread": (max(scores) - min(scores)) / 2 if len(scores) > 1 else None,
                "count": count,
                "standard_error": _standard_error(statistics.fmean(scores), count),
            }
        throughput = [entry["throughput"] for entry in entries if entry.get("throughput")]
        rows.append(
            {
                "method": method,
                "lr": lr,
                "seeds": [entry["seed"] for entry in entries],
                "accuracy": accuracy,
                "trainable_parameters": entries[0].get("trainable_parameters"),
                "tokens_per_second": _mean([t.get("tokens_per_second") for t in throughput]),
                "peak_memory_bytes": _max([t.get("peak_memory_bytes") for t in throughput]),
                "train_seconds": _mean([t.get("wall_seconds") for t in throughput]),
                "curvature_by_kind": entries[0].get("curvature_by_kind") or {},
            }
        )
    order = {method: index for index, method in enumerate(METHODS)}
    rows.sort(key=lambda row: (order.get(row["method"], len(order)), row["lr"] or 0))
    return rows


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def _max(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def _format_accuracy(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    text = f"{100 * cell['mean']:.1f}"
    if cell["spread"] is not None:
        text += f" ± {100 * cell['spread']:.1f}"
    return text


def differences(rows: list[dict[str, Any]], reference: str, against: str) -> list[str]:
    """Sentences comparing two methods per evaluation set, with two standard errors as noise."""
    by_method = {row["method"]: row for row in rows}
    if reference not in by_method or against not in by_method:
        return []
    if any(sum(row["method"] == name for row in rows) > 1 for name in (reference, against)):
        return []  # several learning rates of one method: no single pair to compare
    lines = []
    first, second = by_method[against], by_method[reference]
    for key in sorted(set(first["accuracy"]) & set(second["accuracy"])):
        a, b = first["accuracy"][key], second["accuracy"][key]
        difference = a["mean"] - b["mean"]
        # Two standard errors of the difference of two binomial proportions, each estimated
        # from its own runs' mean over count * number of seeds problems.
        noise = 2 * math.sqrt(
            a["mean"] * (1 - a["mean"]) / (a["count"] * len(a["seeds"]))
            + b["mean"] * (1 - b["mean"]) / (b["count"] * len(b["seeds"]))
        )
        verdict = "within noise" if abs(difference) <= noise else "outside noise"
        lines.append(
            f"- {key}: {against} {100 * a['mean']:.1f} vs {reference} {100 * b['mean']:.1f}, "
            f"difference {100 * difference:+.1f} points, two standard errors "
            f"{100 * noise:.1f}: {verdict}."
        )
    return lines


def render_table(data: dict[str, Any], title: str) -> str:
    rows = aggregate(data["runs"])
    # Evaluation sets in the --eval order of the runs' settings, then any others.
    listed = [
        spec["key"]
        for entry in data["runs"].values()
        for spec in parse_eval_specs(entry.get("settings", {}).get("eval", "") or "x:y")
    ]
    present = {key for entry in data["runs"].values() for key in entry["eval"]}
    sets = [key for key in dict.fromkeys(listed) if key in present]
    sets += sorted(present - set(sets))
    counts = {
        key: next(row["accuracy"][key]["count"] for row in rows if key in row["accuracy"])
        for key in sets
    }
    header = ["method", "lr", "seeds"]
    header += [f"{key.split(':')[0]} {key.split(':')[1]} (n={counts[key]})" for key in sets]
    header += ["trainable params", "train tokens/s", "peak memory (GiB)", "train time (min)"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [
            row["method"],
            f"{row['lr']:g}" if row["lr"] is not None else "-",
            ",".join(str(seed) for seed in row["seeds"] if seed is not None) or "-",
        ]
        cells += [_format_accuracy(row["accuracy"].get(key)) for key in sets]
        params = row["trainable_parameters"]
        cells.append(f"{params:,}" if params else "-")
        speed = row["tokens_per_second"]
        cells.append(f"{speed:.0f}" if speed else "-")
        memory = row["peak_memory_bytes"]
        cells.append(f"{memory / 2**30:.2f}" if memory else "-")
        seconds = row["train_seconds"]
        cells.append(f"{seconds / 60:.1f}" if seconds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Accuracy in percent: the mean over seeds, ± half the range between seeds where there "
        "are two or more."
    )
    curved = [row for row in rows if row["curvature_by_kind"]]
    if curved:
        lines.append("")
        lines.append("Mean curvature per expert kind at the end of training (first seed):")
        lines.append("")
        for row in curved:
            values = ", ".join(f"{kind} {k:+.3f}" for kind, k in row["curvature_by_kind"].items())
            lines.append(f"- {row['method']} (lr {row['lr']:g}): {values}")
    comparisons = differences(rows, "lora", "moslora")
    if comparisons:
        lines += ["", "MoSLoRA against LoRA:", "", *comparisons]
    entries = list(data["runs"].values())
    machine = entries[0]["machine"]
    dates = sorted({entry["date"] for entry in entries})
    lines += [
        "",
        f"Measured on {machine['processor']} ({machine['cpu_count']} CPUs, device "
        f"{machine['device']}, torch {machine['torch']}), {dates[0]}"
        + (f" to {dates[-1]}" if len(dates) > 1 else "")
        + ". Commands of the first run of each method:",
        "",
    ]
    shown = set()
    for entry in entries:
        if entry["method"] in shown:
            continue
        shown.add(entry["method"])
        # Recipes are shown relative to the repository they were read from.
        text = re.sub(r"\S*/(configs/methods/)", r"\1", entry["commands"][0])
        command = shlex.split(text)
        lines.append("    " + shlex.join(["python", *command[1:]]))
    distinct = dict.fromkeys(
        json.dumps(entry["settings"], sort_keys=True) for entry in entries if "settings" in entry
    )
    if distinct:
        lines += ["", "Runner settings:", ""]
        lines += [f"- `{settings}`" for settings in distinct]
    return "\n".join(lines) + "\n"


def write_section(doc: Path, name: str, text: str) -> None:
    if doc.is_dir():
        raise ValueError(f"--doc {doc} is a folder; give the Markdown file to update")
    begin, end = f"<!-- compare:{name}:begin -->", f"<!-- compare:{name}:end -->"
    content = doc.read_text() if doc.is_file() else ""
    block = f"{begin}\n{text}{end}"
    if begin in content and end in content:
        before = content[: content.index(begin)]
        after = content[content.index(end) + len(end) :]
        content = before + block + after
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(doc, content)


def command_report(args: argparse.Namespace) -> int:
    data: dict[str, Any] = {"runs": {}}
    for name in args.results:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--results {path} not found; run `compare.py run` first")
        runs = _load_results(path)["runs"]
        repeated = sorted(set(runs) & set(data["runs"]))
        if repeated:
            raise ValueError(
                f"{path} repeats the run(s) {', '.join(repeated)} of an earlier --results file; "
                "give each run in one file only"
            )
        data["runs"].update(runs)
    if not data["runs"]:
        raise ValueError(f"{', '.join(args.results)} contain no runs yet; run `compare.py run`")
    runs = data["runs"].values()
    models = sorted({str(entry.get("settings", {}).get("model")) for entry in runs})
    title = args.title or "Methods compared on " + (
        "SmolLM2-135M-Instruct" if models == ["None"] else ", ".join(models)
    )
    text = render_table(data, title)
    if args.figures:
        text += _copy_figures(args, data)
    write_section(Path(args.doc), args.name, text)
    print(text)
    return 0


def _copy_figures(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """Plot the named run with `moslora plot` and copy its PNGs next to the document."""
    folder = Path(args.runs) / args.figures / "adapter"
    if args.figures not in data["runs"]:
        raise ValueError(f"--figures {args.figures}: no such run in the results")
    if data["runs"][args.figures]["method"] == "base":
        raise ValueError("--figures base: the base model has no adapter and no training to plot")
    if not folder.is_dir():
        raise FileNotFoundError(f"--figures {args.figures}: run folder {folder} not found")
    _run(_moslora("plot", str(folder)), folder.parent / "commands.log")
    target = Path(args.doc).parent / "figures"
    target.mkdir(parents=True, exist_ok=True)
    lines = ["", f"Figures of the run `{args.figures}` (`moslora plot {folder}`):", ""]
    for png in sorted((folder / "figures").glob("*.png")):
        destination = target / f"{args.name}-{args.figures}-{png.name}"
        shutil.copyfile(png, destination)
        relative = destination.relative_to(Path(args.doc).parent)
        lines.append(f"![{png.stem}]({relative})")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Train and evaluate methods; add them to --results.")
    run.add_argument("--methods", default=",".join(METHODS), help="Comma-separated methods.")
    run.add_argument("--seeds", default="1", help="Comma-separated seeds (base runs once).")
    run.add_argument("--lr", type=float, help="Learning rate for every method (else recipe's).")
    run.add_argument(
        "--lr-from",
        metavar="RESULTS",
        help="Results JSON of learning-rate runs on a selection set: each method trains with "
        "its best learning rate there (DoRA takes LoRA's, single experts the mixture's).",
    )
    run.add_argument("--train-limit", type=int, default=320, help="MAWPS training examples.")
    run.add_argument("--epochs", type=float, default=1.0, help="Passes over the training set.")
    run.add_argument(
        "--train-args", default="", help="Extra `moslora train` flags, e.g. '--max-steps 20'."
    )
    run.add_argument(
        "--eval", default=DEFAULT_EVAL, help="Evaluation sets as NAME:SPLIT[:LIMIT],..."
    )
    run.add_argument(
        "--exclude", default="mawps:train", help="Drop test questions that occur in this set."
    )
    run.add_argument("--max-new-tokens", type=int, default=48, help="Generation limit per problem.")
    run.add_argument("--eval-batch-size", type=int, default=25, help="Problems per batch.")
    run.add_argument("--model", help="Base model folder or Hub id; default SmolLM2-135M.")
    run.add_argument("--runs", default="runs/compare", help="Folder of the run folders.")
    run.add_argument(
        "--results", default="benchmarks/results/compare.json", help="Results JSON to update."
    )
    run.set_defaults(handler=command_run)

    report = commands.add_parser("report", help="Write the results table into --doc.")
    report.add_argument(
        "--results",
        nargs="+",
        default=["benchmarks/results/compare.json"],
        help="Results JSON files to merge; several `run` jobs may each write their own.",
    )
    report.add_argument("--doc", default="docs/benchmarks.md", help="Markdown file to update.")
    report.add_argument("--name", default="mawps", help="Section name inside the markers.")
    report.add_argument("--title", help="Table title; default names the base model of the runs.")
    report.add_argument("--runs", default="runs/compare", help="Folder of the run folders.")
    report.add_argument("--figures", help="Run whose `moslora plot` figures to include.")
    report.set_defaults(handler=command_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"compare.py {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
