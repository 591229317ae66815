"""Figures of a training run: curvatures and expert usage from the diagnostics, and the loss.

matplotlib is imported inside the functions that draw, so that importing moslora stays light.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from moslora.config import CONFIG_NAME
from moslora.diagnostics import (
    DIAGNOSTICS_NAME,
    checkpoint_run_folder,
    read_diagnostics,
    split_module_path,
)
from moslora.files import write_bytes_atomic
from moslora.train import FIGURES_DIR, RUN_CONFIG_NAME

# Up to this many layers, each layer's curvature line gets its own colour, line style and
# marker and a legend entry. More layers share one colour scale with a colorbar.
MAX_LEGEND_LAYERS = 8
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write the figures of the run in ``run_dir`` as PNG files and return their paths.

    ``curvature.png``, ``expert_usage.png`` and ``loss.png`` come from ``diagnostics.jsonl``.
    A run without diagnostics records, such as a PEFT LoRA or DoRA run, gets only ``loss.png``,
    from the log history in ``run_config.json``. The figures go to ``<run_dir>/figures``
    unless ``output_dir`` is given. Figures that the run has no data for are skipped with a
    message on stdout.

    Every input is read and validated and every figure is drawn before the first PNG is
    written, so an invalid record raises ``ValueError`` without leaving a partial set of
    figures. Each PNG is written to a temporary file and then renamed.
    """
    run = Path(run_dir)
    _check_run_folder(run)
    has_diagnostics = (run / DIAGNOSTICS_NAME).is_file()
    has_run_config = (run / RUN_CONFIG_NAME).is_file()
    if not has_diagnostics and not has_run_config:
        raise FileNotFoundError(_no_run_files_message(run))
    records = read_diagnostics(run) if has_diagnostics else []
    run_config = None
    if not records and has_run_config:
        run_config = _read_run_config(run / RUN_CONFIG_NAME)
    steps, losses = _loss_series(records, run_config, run / RUN_CONFIG_NAME)
    if not records and not steps:
        raise ValueError(_no_logged_step_message(run, run_config))
    output = Path(output_dir) if output_dir is not None else run / FIGURES_DIR
    if output.exists() and not output.is_dir():
        raise FileExistsError(
            f"output folder {output} is an existing file; give a folder for the PNGs, which is "
            "created when missing"
        )

    figures = {}
    if records:
        curvature = _draw_curvature(records)
        if curvature is not None:
            figures["curvature.png"] = curvature
        usage = _draw_expert_usage(records, _router_mode(run))
        if usage is not None:
            figures["expert_usage.png"] = usage
    else:
        print(_missing_diagnostics_message(run, has_diagnostics))
    if steps:
        figures["loss.png"] = _draw_loss(steps, losses)
    else:
        print(f"the records of {run / DIAGNOSTICS_NAME} contain no loss: loss.png is not written")
    if not figures:
        raise ValueError(
            f"nothing to plot in {run}: its records contain no loss, every expert is Euclidean "
            "and no module has a router"
        )
    images = {name: _render_png(figure) for name, figure in figures.items()}

    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"failed to create the output folder {output}: {error.strerror}") from error
    written = []
    for name, image in images.items():
        path = output / name
        write_bytes_atomic(path, image)
        written.append(path)
    return written


# ---- reading the run ------------------------------------------------------------------------


def _check_run_folder(run: Path) -> None:
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(
            f"{run} is a file, but a run folder is expected: give the folder written by "
            "`moslora train`"
        )
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} not found")


def _no_run_files_message(run: Path) -> str:
    root = checkpoint_run_folder(run)
    if root is not None:
        return (
            f"{run} is a checkpoint folder, which contains no {DIAGNOSTICS_NAME} or "
            f"{RUN_CONFIG_NAME}: they are in the run folder {root}, so give that folder instead"
        )
    return (
        f"{run} contains neither {DIAGNOSTICS_NAME} nor {RUN_CONFIG_NAME}; give a run folder "
        "written by `moslora train`"
    )


def _no_logged_step_message(run: Path, run_config: dict[str, Any] | None) -> str:
    """Explain that no training step was logged, so the run has nothing to plot."""
    train = run_config.get("train") if run_config is not None else None
    logging_steps = train.get("logging_steps") if isinstance(train, dict) else None
    interval = f" (it logs every {logging_steps} steps)" if logging_steps is not None else ""
    if run_config is not None and run_config.get("finished"):
        history = run_config.get("log_history")
        last = history[-1] if isinstance(history, list) and history else None
        final_step = last.get("step") if isinstance(last, dict) else None
        ended = f" at step {final_step}" if final_step is not None else ""
        return (
            f"nothing to plot in {run}: the run finished{ended} before its first logging "
            f"step{interval}, so no step was logged; train it again with a lower "
            "--logging-steps"
        )
    return (
        f"nothing to plot in {run} yet: no training step has been logged{interval}; plot "
        "again after the first logging step"
    )


def _missing_diagnostics_message(run: Path, has_diagnostics: bool) -> str:
    peft_type = _peft_type(run)
    if peft_type is not None:
        return (
            f"{run} is a PEFT {peft_type} run, which has no curvatures or router: only loss.png "
            f"is written, from {RUN_CONFIG_NAME}"
        )
    if has_diagnostics:
        return (
            f"{run / DIAGNOSTICS_NAME} has no records: only loss.png is written, from "
            f"{RUN_CONFIG_NAME}"
        )
    return (
        f"{run} has no {DIAGNOSTICS_NAME} (the run was made without diagnostics): only loss.png "
        f"is written, from {RUN_CONFIG_NAME}"
    )


def _adapter_config(run: Path) -> dict[str, Any] | None:
    """Return the parsed adapter config of the run, or None when it is missing or invalid."""
    path = run / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _peft_type(run: Path) -> str | None:
    """Name the PEFT adapter type of the run ("LoRA", "DoRA"), or None for any other run."""
    data = _adapter_config(run)
    if data is None or "peft_type" not in data:
        return None
    if data["peft_type"] == "LORA":
        return "DoRA" if data.get("use_dora") else "LoRA"
    return str(data["peft_type"])


def _router_mode(run: Path) -> str | None:
    """Return the router mode ('dense', 'topk') of the run's MoSLoRA adapter, or None."""
    data = _adapter_config(run)
    mode = data.get("router") if data is not None else None
    return mode if isinstance(mode, str) else None


def _read_run_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid run record ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a valid run record: it must be a JSON object")
    return data


def _loss_series(
    records: list[dict[str, Any]], run_config: dict[str, Any] | None, run_config_path: Path
) -> tuple[list[int], list[float]]:
    """Return the steps and training losses of the records, or else of the run's log history."""
    if records:
        points = [(record["step"], record.get("loss")) for record in records]
    elif run_config is not None:
        points = _logged_losses(run_config, run_config_path)
    else:
        return [], []
    points = [(step, loss) for step, loss in points if loss is not None]
    return [step for step, _ in points], [float(loss) for _, loss in points]


def _logged_losses(run_config: dict[str, Any], path: Path) -> list[tuple[int, float]]:
    history = run_config.get("log_history") or []
    if not isinstance(history, list):
        raise ValueError(f'{path}: "log_history" must be a list, not {type(history).__name__}')
    points = []
    for index, entry in enumerate(history):
        if not isinstance(entry, dict) or "loss" not in entry:
            continue
        step, loss = entry.get("step"), entry["loss"]
        valid_step = isinstance(step, int) and not isinstance(step, bool)
        valid_loss = isinstance(loss, (int, float)) and not isinstance(loss, bool)
        if not valid_step or not valid_loss:
            raise ValueError(
                f'{path}: entry {index} of "log_history" must have an integer "step" and a '
                f'numeric "loss"'
            )
        points.append((step, loss))
    return points


# ---- drawing --------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _render_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _integer_steps(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_loss(steps: list[int], losses: list[float]):
    figure = _new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    axes.plot(steps, losses, marker="o" if len(steps) <= 50 else None, markersize=3)
    axes.set_xlabel("optimizer step")
    _integer_steps(axes)
    axes.set_ylabel("training loss")
    axes.set_title("training loss")
    axes.grid(alpha=0.3)
    return figure


def _curvature_series(records: list[dict[str, Any]]) -> dict[tuple, dict]:
    """Map (module name, expert index, kind) to {layer: (steps, curvatures)} for curved experts."""
    series: dict[tuple, dict] = {}
    for record in records:
        for path, values in record["modules"].items():
            layer, name = split_module_path(path)
            for index, kind in enumerate(values["kinds"]):
                if kind == "euclidean":
                    continue
                steps, curvatures = series.setdefault((name, index, kind), {}).setdefault(
                    layer, ([], [])
                )
                steps.append(record["step"])
                curvatures.append(values["curvature"][index])
    return series


def _layer_styles(layers: list[int]) -> tuple[dict[int, dict[str, Any]], Any]:
    """Return the plot settings of each layer's curvature line, and the colour norm or None.

    With few layers every layer gets its own colour, line style and marker, so that lines with
    equal values stay visible on top of each other. With more layers the colour encodes the
    layer index on the viridis scale, and the lines are partly transparent.
    """
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm

    if len(layers) <= MAX_LEGEND_LAYERS:
        colours = colormaps["tab10"]
        styles = {
            layer: {
                "color": colours(position),
                "linestyle": LINE_STYLES[position % len(LINE_STYLES)],
                "marker": MARKERS[position],
                "alpha": 0.85,
                "label": f"layer {layer}",
            }
            for position, layer in enumerate(layers)
        }
        return styles, None
    colormap = colormaps["viridis"]
    # One colour band per layer index, so the colorbar reads as whole layers.
    norm = BoundaryNorm([index - 0.5 for index in range(layers[0], layers[-1] + 2)], colormap.N)
    styles = {layer: {"color": colormap(norm(layer)), "alpha": 0.7} for layer in layers}
    return styles, norm


def _draw_curvature(records: list[dict[str, Any]]):
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import MaxNLocator

    series = _curvature_series(records)
    if not series:
        print("no module has a non-Euclidean expert (curvature 0): curvature.png is not written")
        return None
    names = list(dict.fromkeys(name for name, _, _ in series))
    experts = sorted({(index, kind) for _, index, kind in series})
    layers = sorted({layer for lines in series.values() for layer in lines if layer is not None})
    styles, norm = _layer_styles(layers)

    figure = _new_figure(4.0 * len(experts) + 1.5, 2.8 * len(names) + 0.6)
    grid = figure.subplots(len(names), len(experts), squeeze=False)
    legend: dict[str, Any] = {}
    for row, name in enumerate(names):
        for column, (index, kind) in enumerate(experts):
            axes = grid[row][column]
            lines = series.get((name, index, kind))
            if lines is None:
                axes.set_axis_off()
                continue
            for layer, (steps, curvatures) in sorted(
                lines.items(), key=lambda item: (item[0] is None, item[0] or 0)
            ):
                if layer is None:
                    style = {"color": "black", "linestyle": "--", "label": "no layer"}
                else:
                    style = dict(styles[layer])
                if "marker" in style:
                    # Hollow markers of different shapes stay visible where lines coincide.
                    style["markersize"] = 5
                    style["markerfacecolor"] = "none"
                    style["markevery"] = max(1, len(steps) // 25)
                (line,) = axes.plot(steps, curvatures, linewidth=1.2, **style)
                if "label" in style:
                    legend.setdefault(style["label"], line)
            axes.set_title(f"{name}, expert {index} ({kind})", fontsize="medium")
            axes.set_xlabel("optimizer step")
            _integer_steps(axes)
            axes.set_ylabel("curvature k")
            axes.grid(alpha=0.3)
    if norm is not None:
        colorbar = figure.colorbar(
            ScalarMappable(norm=norm, cmap=colormaps["viridis"]), ax=grid, label="layer index"
        )
        colorbar.locator = MaxNLocator(integer=True)
        colorbar.update_ticks()
    if legend:
        figure.legend(
            list(legend.values()), list(legend), loc="outside right upper", fontsize="small"
        )
    figure.suptitle("curvature of each non-Euclidean expert, one line per layer")
    return figure


def _draw_expert_usage(records: list[dict[str, Any]], router: str | None):
    last = records[-1]
    columns: list[tuple[str, int, str]] = []
    rows: list[int | None] = []
    cells: dict[tuple[int | None, str, int], float] = {}
    for path, values in last["modules"].items():
        kinds = values["kinds"]
        if len(kinds) < 2:
            continue
        layer, name = split_module_path(path)
        if layer not in rows:
            rows.append(layer)
        for index, kind in enumerate(kinds):
            if (name, index, kind) not in columns:
                columns.append((name, index, kind))
            probabilities = values["router_weight"]
            if probabilities is not None:
                cells[(layer, name, index)] = probabilities[index]
    if not columns:
        print(
            f"no module in the record of step {last['step']} has more than one expert, so "
            "nothing is routed: expert_usage.png is not written"
        )
        return None
    rows.sort(key=lambda layer: (layer is None, layer or 0))
    matrix = [
        [cells.get((layer, name, index), math.nan) for name, index, _ in columns] for layer in rows
    ]

    figure = _new_figure(max(6.0, 0.55 * len(columns) + 2.5), max(3.5, 0.35 * len(rows) + 2.5))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(columns)))
    axes.set_xticklabels(
        [f"{name} {index}:{kind}" for name, index, kind in columns], rotation=90, fontsize="small"
    )
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels(["-" if layer is None else str(layer) for layer in rows])
    axes.set_xlabel("module and expert")
    axes.set_ylabel("layer")
    title = (
        f"mean router probability per expert over the logging window ending at step {last['step']}"
    )
    if router == "topk":
        title += "\n(softmax probability before the top-k selection)"
    axes.set_title(title, fontsize="medium")
    # Cell values are written out only while they stay legible.
    if len(rows) * len(columns) <= 300:
        for row, values in enumerate(matrix):
            for column, value in enumerate(values):
                if not math.isnan(value):
                    color = "white" if value < 0.5 else "black"
                    axes.text(
                        column, row, f"{value:.2f}", ha="center", va="center", color=color,
                        fontsize="x-small",
                    )  # fmt: skip
    figure.colorbar(image, ax=axes, label="mean router probability")
    return figure
