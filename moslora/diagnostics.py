"""Training diagnostics of MoSLoRA runs: curvatures and router probabilities over training steps.

`DiagnosticsCallback` appends one JSON record per logging step to ``<run>/diagnostics.jsonl``
and writes the same scalars to TensorBoard. `read_diagnostics` reads the records back and
validates their structure, and `inspect_adapter` summarises a saved adapter without loading
its base model.

A record is a JSON object with the integer ``step`` of the optimizer, ``epoch``, ``loss``,
``learning_rate`` and ``modules``, which maps each adapted module's path to its expert
``kinds``, their ``curvature`` at that step and ``router_weight``. Despite its name,
``router_weight`` is the mean router probability (the softmax of the router logits, before any
top-k selection) of each expert over the micro-batches since the previous record. It is null
when the module ran no forward pass in that window.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from moslora.config import CONFIG_NAME, KIND_SIGN, WEIGHTS_NAME, MoSLoraConfig, read_adapter_json
from moslora.files import write_text_atomic
from moslora.model import MoSLoraModel
from moslora.train import CHECKPOINTS, DIAGNOSTICS_NAME, TENSORBOARD_DIR

logger = logging.getLogger(__name__)


# ---- curvature from the saved parameters ----------------------------------------------------


def curvature_from_raw(
    raw: torch.Tensor, kinds: Sequence[str], max_curvature: float
) -> torch.Tensor:
    """Map unconstrained curvature parameters to the curvature of each expert, float32.

    The formula is the one of `MoSLoraLinear.curvature`: a kind with a fixed sign gets
    ``sign * max_curvature * sigmoid(raw)`` (0 for a Euclidean expert), and a kind of either
    sign ('free') gets ``max_curvature * tanh(raw)``.
    """
    raw = raw.float()
    if raw.shape != (len(kinds),):
        raise ValueError(
            f"curvature parameters of shape {tuple(raw.shape)} do not fit {len(kinds)} experts"
        )
    signs = torch.tensor([KIND_SIGN[kind] or 0 for kind in kinds], dtype=torch.float32)
    free = torch.tensor([KIND_SIGN[kind] is None for kind in kinds])
    signed = signs * max_curvature * torch.sigmoid(raw)
    return torch.where(free, max_curvature * torch.tanh(raw), signed)


def split_module_path(path: str) -> tuple[int | None, str]:
    """Split a module path into its layer index and the rest of the path after that index.

    ``model.layers.3.self_attn.q_proj`` gives ``(3, "self_attn.q_proj")``. A path without a
    numeric component gives ``(None, path)``.
    """
    match = re.search(r"(?:^|\.)(\d+)\.(.+)$", path)
    if match is None:
        return None, path
    return int(match.group(1)), match.group(2)


# ---- the training callback ------------------------------------------------------------------


class DiagnosticsCallback(TrainerCallback):
    """Record curvatures and mean router probabilities of a `MoSLoraModel` at each logging step.

    After every micro-batch, the callback adds each adapted module's mean router probability
    per expert. A module with one expert has no router and counts as probability 1.0. At each
    log that contains the training loss, it appends one line to ``<run_dir>/diagnostics.jsonl``
    with the curvatures at that step and the router probabilities averaged since the previous
    record, in the field ``router_weight``. With router 'topk' these are the softmax
    probabilities before the top-k selection, not the renormalised mixing weights. When
    ``tensorboard`` is true, it also writes these values to TensorBoard in
    ``<run_dir>/tensorboard``. Only the main process writes.
    """

    def __init__(self, model: MoSLoraModel, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.model = model
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DIAGNOSTICS_NAME
        self.tensorboard = tensorboard
        self._writer = None
        self._weight_sums: dict[str, list[float]] = {}
        self._weight_counts: dict[str, int] = {}

    # ---- Trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run starts at step 0, so every earlier record is dropped. A resumed run drops
        # the records after its checkpoint, because the resumed steps log them again.
        self._drop_records_after(state.global_step)
        self._reset_weights()
        self._close_writer()
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at and after that step in the event files of earlier
            # attempts, as the records file drops them.
            self._writer = SummaryWriter(
                log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=state.global_step + 1
            )

    def on_substep_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._accumulate_weights()

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._accumulate_weights()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = self._make_record(state, logs)
        line = json.dumps(record) + "\n"
        # Each record is one write call of a complete line, so a kill leaves at most an
        # unterminated last line. read_diagnostics skips it and the next on_train_begin drops it.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
        if self._writer is not None:
            self._write_scalars(record)
        self._reset_weights()

    def on_train_end(self, args, state, control, **kwargs):
        self._close_writer()

    # ---- helpers ------------------------------------------------------------------------------

    def _active_layers(self):
        for path, layer in self.model.named_adapter_layers():
            if layer.active_adapter is not None:
                yield path, layer

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _reset_weights(self) -> None:
        self._weight_sums = {}
        self._weight_counts = {}

    def _accumulate_weights(self) -> None:
        statistics = self.model.routing_statistics()
        for path, layer in self._active_layers():
            experts = layer.adapter_configs[layer.active_adapter].num_experts
            if experts == 1:
                weights = [1.0]
            elif path in statistics:
                weights = statistics[path]["mean_probability"]
            else:
                continue
            sums = self._weight_sums.setdefault(path, [0.0] * len(weights))
            for index, weight in enumerate(weights):
                sums[index] += weight
            self._weight_counts[path] = self._weight_counts.get(path, 0) + 1

    def _make_record(self, state, logs: dict[str, Any]) -> dict[str, Any]:
        modules = {}
        # NOTE: only tested without FSDP and DeepSpeed, whose local parameters may be shards.
        for path, layer in self._active_layers():
            count = self._weight_counts.get(path, 0)
            weights = None
            if count:
                weights = [total / count for total in self._weight_sums[path]]
            modules[path] = {
                "kinds": list(layer.adapter_configs[layer.active_adapter].experts),
                "curvature": layer.curvature().detach().float().cpu().tolist(),
                "router_weight": weights,
            }
        return {
            "step": state.global_step,
            "epoch": state.epoch,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "modules": modules,
        }

    def _write_scalars(self, record: dict[str, Any]) -> None:
        step = record["step"]
        writer = self._writer
        writer.add_scalar("train/loss", record["loss"], step)
        if record["learning_rate"] is not None:
            writer.add_scalar("train/learning_rate", record["learning_rate"], step)
        for path, values in record["modules"].items():
            kinds = values["kinds"]
            for index, (kind, curvature) in enumerate(zip(kinds, values["curvature"], strict=True)):
                if kind != "euclidean":
                    writer.add_scalar(f"curvature/{path}/{index}-{kind}", curvature, step)
            if len(kinds) > 1 and values["router_weight"] is not None:
                for index, weight in enumerate(values["router_weight"]):
                    writer.add_scalar(f"router/{path}/{index}-{kinds[index]}", weight, step)
        writer.flush()

    def _drop_records_after(self, step: int) -> None:
        """Rewrite the records file atomically without the records of steps after ``step``."""
        if not self.path.is_file():
            return
        lines = _read_lines(self.path)
        remaining = [text for _, text, record in lines if record["step"] <= step]
        dropped = len(lines) - len(remaining)
        if dropped:
            logger.info(
                "dropped %d diagnostics record(s) after step %d in %s", dropped, step, self.path
            )
        write_text_atomic(self.path, "".join(text + "\n" for text in remaining))


# ---- reading the records --------------------------------------------------------------------


def _read_lines(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """Parse the records file into (line number, line text, record), skipping blank lines.

    Raises ``ValueError`` naming the file, the line and the field of the first record that is
    invalid JSON or does not have the structure described in the module docstring.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    # The text after the last newline is empty for a complete file; anything else is a line
    # whose write was cut short.
    unterminated = lines.pop()
    if unterminated.strip():
        logger.warning(
            "%s: skipping the unterminated line %d, whose write did not finish",
            path,
            len(lines) + 1,
        )
    parsed = []
    kinds_by_path: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}, line {number}: invalid JSON ({error}); delete or repair that line"
            ) from error
        if not isinstance(record, dict) or not _is_integer(record.get("step")):
            raise ValueError(
                f'{path}, line {number}: a record must be a JSON object with an integer "step"'
            )
        problem = _record_problem(record, kinds_by_path)
        if problem is not None:
            raise ValueError(f"{path}, line {number}: {problem}; delete or repair that line")
        parsed.append((number, line, record))
    return parsed


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """Name the JSON type of ``value`` with a short excerpt, for error messages."""
    text = json.dumps(value)
    if len(text) > 40:
        text = text[:37] + "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return text
    if isinstance(value, str):
        return f"the string {text}"
    if isinstance(value, dict):
        return f"the object {text}"
    if isinstance(value, list):
        return f"the list {text}"
    return f"the number {text}"


def _record_problem(record: dict[str, Any], kinds_by_path: dict[str, list[str]]) -> str | None:
    """Describe the first field of ``record`` with a wrong structure, or return None.

    ``kinds_by_path`` maps each module path to the expert kinds of its first record. Paths
    seen for the first time are added to it, so a later record with other kinds is rejected.
    """
    for name in ("epoch", "loss", "learning_rate"):
        value = record.get(name)
        if value is not None and not _is_number(value):
            return f'field "{name}" must be a number or null, not {_describe(value)}'
    modules = record.get("modules")
    if not isinstance(modules, dict):
        return (
            'field "modules" must be an object that maps module paths to their kinds, '
            f"curvature and router_weight, not {_describe(modules)}"
        )
    for path, values in modules.items():
        field = f"modules[{json.dumps(path)}]"
        if not isinstance(values, dict):
            return f"field {field} must be an object, not {_describe(values)}"
        kinds = values.get("kinds")
        if (
            not isinstance(kinds, list)
            or not kinds
            or not all(isinstance(kind, str) for kind in kinds)
        ):
            return (
                f"field {field}.kinds must be a non-empty list of expert kinds (strings), "
                f"not {_describe(kinds)}"
            )
        earlier = kinds_by_path.setdefault(path, kinds)
        if kinds != earlier:
            return (
                f"field {field}.kinds is {_describe(kinds)}, but an earlier record of that "
                f"module lists {_describe(earlier)}"
            )
        for name, nullable in (("curvature", False), ("router_weight", True)):
            value = values.get(name)
            if value is None and nullable:
                continue
            expected = "a list of numbers or null" if nullable else "a list of numbers"
            if not isinstance(value, list) or not all(_is_number(item) for item in value):
                return f"field {field}.{name} must be {expected}, not {_describe(value)}"
            if len(value) != len(kinds):
                return (
                    f"field {field}.{name} has {len(value)} values, but {field}.kinds lists "
                    f"{len(kinds)} experts"
                )
    return None


def read_diagnostics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Read and validate the records of ``<run_dir>/diagnostics.jsonl``, in the order written.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` naming the line and
    the field of a malformed record (see the module docstring for the structure). An
    unterminated last line, left by a kill during its write, is skipped.
    """
    path = Path(run_dir) / DIAGNOSTICS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the run was made without diagnostics; train the adapter with "
            "`moslora train` first, which records them for MoSLoRA runs"
        )
    return [record for _, _, record in _read_lines(path)]


def checkpoint_run_folder(folder: str | Path) -> Path | None:
    """Return the run folder of a ``<run>/checkpoints/checkpoint-N`` folder, or None.

    The run folder, not the checkpoint, contains ``diagnostics.jsonl`` and ``run_config.json``.
    """
    absolute = Path(os.path.abspath(folder))
    if re.fullmatch(r"checkpoint-\d+", absolute.name) and absolute.parent.name == CHECKPOINTS:
        return absolute.parent.parent
    return None


# ---- summarising a saved adapter ------------------------------------------------------------


def inspect_adapter(adapter_dir: str | Path, output_format: str = "table") -> str:
    """Summarise the adapter saved in ``adapter_dir`` as a text table or as JSON.

    A MoSLoRA adapter gets one row per adapted module with the input scale and, per expert,
    the kind, the curvature in the saved adapter and the mean router probability. That
    probability comes from the last record of ``diagnostics.jsonl`` in the same folder, when
    there is one, and averages over that record's logging window. A PEFT adapter gets a
    one-line summary. No base model is loaded.
    """
    if output_format not in ("table", "json"):
        raise ValueError(f"output format {output_format!r} is invalid; choose table or json")
    folder = Path(adapter_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is a file, but an adapter folder is expected: give the folder that "
            f"contains {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} not found")
    data = read_adapter_json(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: the adapter folder has no weights")
    if isinstance(data, dict) and "peft_type" in data:
        summary = _peft_summary(folder, data)
        return json.dumps(summary, indent=2) if output_format == "json" else _peft_line(summary)
    summary = _moslora_summary(folder)
    return json.dumps(summary, indent=2) if output_format == "json" else _moslora_table(summary)


def _read_tensors(path: Path, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys()) if keys is None else list(keys)
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); save the adapter again"
        ) from error


def _peft_summary(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    targets = data.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(targets)
    peft_type = str(data["peft_type"])
    if peft_type == "LORA":
        peft_type = "DoRA" if data.get("use_dora") else "LoRA"
    return {
        "adapter_dir": str(folder),
        "adapter_type": "peft",
        "peft_type": peft_type,
        "r": data.get("r"),
        "lora_alpha": data.get("lora_alpha"),
        "target_modules": targets,
        "trainable_parameters": sum(tensor.numel() for tensor in tensors.values()),
    }


def _peft_line(summary: dict[str, Any]) -> str:
    targets = summary["target_modules"]
    if isinstance(targets, list):
        targets = ", ".join(targets)
    return (
        f"{summary['adapter_dir']}: PEFT {summary['peft_type']} adapter, r={summary['r']}, "
        f"lora_alpha={summary['lora_alpha']}, target modules {targets}, "
        f"{summary['trainable_parameters']:,d} trainable parameters"
    )


def _moslora_summary(folder: Path) -> dict[str, Any]:
    config = MoSLoraConfig.load(folder)
    weights_path = folder / WEIGHTS_NAME
    tensors = _read_tensors(weights_path)
    suffix = ".moslora_curvature"
    paths = [key[: -len(suffix)] for key in tensors if key.endswith(suffix)]
    if not paths:
        raise ValueError(
            f"{weights_path} contains no MoSLoRA curvature parameters; give a folder written by "
            "MoSLoraModel.save_pretrained"
        )
    paths.sort(key=lambda path: _module_order(path, config.target_modules))
    run_dir = checkpoint_run_folder(folder)

    last = None
    diagnostics_path = folder / DIAGNOSTICS_NAME
    if diagnostics_path.is_file():
        records = read_diagnostics(folder)
        last = records[-1] if records else None
    if last is not None:
        _check_record_experts(last, paths, config.experts, diagnostics_path)

    modules = []
    for path in paths:
        raw = tensors[f"{path}.moslora_curvature"]
        if raw.shape != (config.num_experts,):
            raise ValueError(
                f"{weights_path}: {path}.moslora_curvature has shape {tuple(raw.shape)}, but "
                f"{CONFIG_NAME} lists {config.num_experts} experts"
            )
        curvature = curvature_from_raw(raw, config.experts, config.max_curvature).tolist()
        log_scale = tensors.get(f"{path}.moslora_log_scale")
        probabilities = None
        if last is not None and path in last["modules"]:
            probabilities = last["modules"][path]["router_weight"]
        layer, name = split_module_path(path)
        modules.append(
            {
                "path": path,
                "layer": layer,
                "module": name,
                "input_scale": math.exp(float(log_scale)) if log_scale is not None else None,
                "experts": [
                    {
                        "kind": kind,
                        "curvature": curvature[index],
                        "router_probability": (
                            probabilities[index] if probabilities is not None else None
                        ),
                    }
                    for index, kind in enumerate(config.experts)
                ],
            }
        )
    return {
        "adapter_dir": str(folder),
        "adapter_type": "moslora",
        "experts": list(config.experts),
        "r": config.r,
        "max_curvature": config.max_curvature,
        "router": config.router,
        "diagnostics_step": last["step"] if last is not None else None,
        "checkpoint_run_dir": str(run_dir) if run_dir is not None else None,
        "modules": modules,
    }


def _check_record_experts(
    record: dict[str, Any], paths: list[str], experts: list[str], diagnostics_path: Path
) -> None:
    """Raise ValueError when the record lists other experts than the adapter for a module."""
    for path in paths:
        values = record["modules"].get(path)
        if values is not None and values["kinds"] != list(experts):
            raise ValueError(
                f"{diagnostics_path}: the record of step {record['step']} lists the experts "
                f"{', '.join(values['kinds'])} for {path}, but {CONFIG_NAME} lists "
                f"{', '.join(experts)}; the records belong to another adapter"
            )


def _module_order(path: str, targets: list[str] | str) -> tuple:
    """Sort key of a module path: by layer, then in the order of ``target_modules``."""
    layer, name = split_module_path(path)
    short_name = path.rsplit(".", 1)[-1]
    position = -1
    if isinstance(targets, list) and short_name in targets:
        position = targets.index(short_name)
    return (layer is None, layer or 0, position, name)


def _format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _moslora_table(summary: dict[str, Any]) -> str:
    experts = summary["experts"]
    header = ["layer", "module"]
    for index, kind in enumerate(experts):
        header += [f"{index}:{kind} k", f"{index}:{kind} w"]
    header.append("input scale")

    rows = [header]
    for module in summary["modules"]:
        row = ["-" if module["layer"] is None else str(module["layer"]), module["module"]]
        for expert in module["experts"]:
            row += [
                _format_number(expert["curvature"]),
                _format_number(expert["router_probability"]),
            ]
        row.append(_format_number(module["input_scale"]))
        rows.append(row)

    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    # The module name is left-aligned and every number right-aligned.
    lines = [
        "  ".join(
            cell.ljust(width) if column == 1 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]

    title = (
        f"{summary['adapter_dir']}: MoSLoRA adapter, experts {', '.join(experts)}, "
        f"r={summary['r']}, {len(summary['modules'])} modules"
    )
    return "\n".join(
        [title, "k: curvature in the saved adapter", _probability_note(summary), *lines]
    )


def _probability_note(summary: dict[str, Any]) -> str:
    """Describe the w columns of the table: what they average, over which steps, from where."""
    step = summary["diagnostics_step"]
    if step is None:
        run_dir = summary["checkpoint_run_dir"]
        if run_dir is not None:
            return (
                f"w: - ({DIAGNOSTICS_NAME} is written to the run folder {run_dir}, "
                "not to checkpoint folders)"
            )
        return f"w: - (no {DIAGNOSTICS_NAME} records in this folder)"
    probability = "mean router probability"
    if summary["router"] == "topk":
        probability += " (softmax before the top-k selection)"
    return (
        f"w: {probability} over the logging window ending at step {step} (from {DIAGNOSTICS_NAME})"
    )
