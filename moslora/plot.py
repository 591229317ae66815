"""Figures of a training run: curvatures and expert usage from the diagnostics, and the loss.

matplotlib is imported inside the functions that draw, so that importing moslora stays light.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moslora.config import CONFIG_NAME
from moslora.diagnostics import DIAGNOSTICS_NAME, read_diagnostics, split_module_path
from moslora.train import FIGURES_DIR, RUN_CONFIG_NAME


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write the figures of the run in ``run_dir`` as PNG files and return their paths.

    ``curvature.png``, ``expert_usage.png`` and ``loss.png`` come from ``diagnostics.jsonl``.
    A run without diagnostics records, such as a PEFT LoRA or DoRA run, gets only ``loss.png``,
    from the log history in ``run_config.json``. The figures go to ``<run_dir>/figures``
    unless ``output_dir`` is given. Figures that the run has no data for are skipped with a
    message on stdout.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} not found")
    has_diagnostics = (run / DIAGNOSTICS_NAME).is_file()
    has_run_config = (run / RUN_CONFIG_NAME).is_file()
    if not has_diagnostics and not has_run_config:
        raise FileNotFoundError(
            f"{run} contains neither {DIAGNOSTICS_NAME} nor {RUN_CONFIG_NAME}; give a run folder "
            "written by `moslora train`"
        )
    records = read_diagnostics(run) if has_diagnostics else []
    output = Path(output_dir) if output_dir is not None else run / FIGURES_DIR
    output.mkdir(parents=True, exist_ok=True)

    written = []
    if records:
        for draw in (_plot_curvature, _plot_expert_usage):
            path = draw(records, output)
            if path is not None:
                written.append(path)
    else:
        print(_missing_diagnostics_message(run, has_diagnostics))

    steps, losses = _loss_series(run, records)
    if steps:
        written.append(_plot_loss(steps, losses, output))
    else:
        print(f"{run}: no training loss recorded yet; loss.png is not written")
    if not written:
        raise ValueError(f"nothing to plot in {run}: it has no diagnostics records and no loss")
    return written


def _missing_diagnostics_message(run: Path, has_diagnostics: bool) -> str:
    peft_type = _peft_type(run)
    if peft_type is not None:
        return (
            f"{run} is a PEFT {peft_type} run, which has no curvatures or router: only loss.png "
            f"is written, from {RUN_CONFIG_NAME}"
        )
    if has_diagnostics:
        return f"{run}/{DIAGNOSTICS_NAME} has no records yet: only loss.png can be written"
    return (
        f"{run} has no {DIAGNOSTICS_NAME} (the run was made without diagnostics): only loss.png "
        f"is written, from {RUN_CONFIG_NAME}"
    )


def _peft_type(run: Path) -> str | None:
    """Name the PEFT adapter type of the run ("LoRA", "DoRA"), or None for any other run."""
    path = run / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "peft_type" not in data:
        return None
    if data["peft_type"] == "LORA":
        return "DoRA" if data.get("use_dora") else "LoRA"
    return str(data["peft_type"])


def _loss_series(run: Path, records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    if records:
        points = [(record["step"], record.get("loss")) for record in records]
    else:
        path = run / RUN_CONFIG_NAME
        if not path.is_file():
            return [], []
        try:
            history = json.loads(path.read_text()).get("log_history") or []
        except (json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{path} is not a valid run record ({error})") from error
        points = [(entry.get("step"), entry.get("loss")) for entry in history if "loss" in entry]
    points = [(step, loss) for step, loss in points if step is not None and loss is not None]
    return [step for step, _ in points], [float(loss) for _, loss in points]


# ---- drawing --------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _integer_steps(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path


def _plot_loss(steps: list[int], losses: list[float], output: Path) -> Path:
    figure = _new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    axes.plot(steps, losses, marker="o" if len(steps) <= 50 else None, markersize=3)
    axes.set_xlabel("optimizer step")
    _integer_steps(axes)
    axes.set_ylabel("training loss")
    axes.set_title("training loss")
    axes.grid(alpha=0.3)
    return _save(figure, output / "loss.png")


def _curvature_series(records: list[dict[str, Any]]) -> dict[tuple, dict]:
    """Map (module name, expert index, kind) to {layer: (steps, curvatures)} for curved experts."""
    series: dict[tuple, dict] = {}
    for record in records:
        for path, values in record.get("modules", {}).items():
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


def _plot_curvature(records: list[dict[str, Any]], output: Path) -> Path | None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm
    from matplotlib.ticker import MaxNLocator

    series = _curvature_series(records)
    if not series:
        print("every expert is Euclidean (curvature 0): curvature.png is not written")
        return None
    names = list(dict.fromkeys(name for name, _, _ in series))
    experts = sorted({(index, kind) for _, index, kind in series})
    layers = sorted({layer for lines in series.values() for layer in lines if layer is not None})
    low, high = (layers[0], layers[-1]) if layers else (0, 0)
    colormap = colormaps["viridis"]
    # One colour band per layer index, so the colorbar reads as whole layers.
    norm = BoundaryNorm([index - 0.5 for index in range(low, high + 2)], colormap.N)

    figure = _new_figure(4.0 * len(experts) + 1.5, 2.8 * len(names) + 0.6)
    grid = figure.subplots(len(names), len(experts), squeeze=False)
    for row, name in enumerate(names):
        for column, (index, kind) in enumerate(experts):
            axes = grid[row][column]
            lines = series.get((name, index, kind))
            if lines is None:
                axes.set_axis_off()
                continue
            unnumbered = False
            for layer, (steps, curvatures) in sorted(
                lines.items(), key=lambda item: (item[0] is None, item[0] or 0)
            ):
                if layer is None:
                    unnumbered = True
                    axes.plot(steps, curvatures, color="black", linestyle="--", label="no layer")
                else:
                    axes.plot(steps, curvatures, color=colormap(norm(layer)), linewidth=1.2)
            if unnumbered:
                axes.legend(fontsize="small")
            axes.set_title(f"{name}, expert {index} ({kind})", fontsize="medium")
            axes.set_xlabel("optimizer step")
            _integer_steps(axes)
            axes.set_ylabel("curvature k")
            axes.grid(alpha=0.3)
    colorbar = figure.colorbar(
        ScalarMappable(norm=norm, cmap=colormap), ax=grid, label="layer index"
    )
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()
    figure.suptitle("curvature of each non-Euclidean expert, one line per layer")
    return _save(figure, output / "curvature.png")


def _plot_expert_usage(records: list[dict[str, Any]], output: Path) -> Path | None:
    last = records[-1]
    modules = last.get("modules", {})
    columns: list[tuple[str, int, str]] = []
    rows: list[int | None] = []
    cells: dict[tuple[int | None, str, int], float] = {}
    for path, values in modules.items():
        kinds = values["kinds"]
        if len(kinds) < 2:
            continue
        layer, name = split_module_path(path)
        if layer not in rows:
            rows.append(layer)
        for index, kind in enumerate(kinds):
            if (name, index, kind) not in columns:
                columns.append((name, index, kind))
            weights = values.get("router_weight")
            if weights is not None:
                cells[(layer, name, index)] = weights[index]
    if not columns:
        print(
            "every adapted module has one expert, so nothing is routed: "
            "expert_usage.png is not written"
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
    axes.set_title(f"mean router weight per expert at step {last['step']}")
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
    figure.colorbar(image, ax=axes, label="mean router weight")
    return _save(figure, output / "expert_usage.png")
