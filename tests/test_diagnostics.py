"""Training diagnostics on the tiny model: the records file, TensorBoard, plots and inspection."""

import copy
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from tiny_models import VOCAB, randomise_adapter, tiny_model
from transformers import TrainerControl, TrainerState

from moslora import MoSLoraConfig, MoSLoraLinear, get_moslora_model
from moslora.cli import main
from moslora.config import CONFIG_NAME, EXPERT_KINDS, WEIGHTS_NAME
from moslora.diagnostics import (
    DIAGNOSTICS_NAME,
    TENSORBOARD_DIR,
    DiagnosticsCallback,
    curvature_from_raw,
    inspect_adapter,
    read_diagnostics,
    split_module_path,
)
from moslora.plot import plot_run
from moslora.train import (
    RUN_CONFIG_NAME,
    ListDataset,
    MoSLoraTrainer,
    TrainConfig,
    training_arguments,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _make_trainer(model_dir, output, adapter_config, **settings):
    """A MoSLoraTrainer over a few MAWPS examples with a DiagnosticsCallback writing to output."""
    from moslora.data import CausalLMCollator, load_examples, tokenize_for_training
    from moslora.hub import load_model_and_tokenizer

    values = dict(
        output=str(output), model=str(model_dir), limit=8, max_steps=6, batch_size=2,
        max_length=192, logging_steps=2, save_steps=100, lr=5e-3, curvature_lr=5e-2,
        warmup_ratio=0.0, progress=False,
    )  # fmt: skip
    config = TrainConfig(**{**values, **settings})
    examples = load_examples("mawps", "train", limit=config.limit, for_training=True)
    transformers.set_seed(config.seed)
    base, tokenizer = load_model_and_tokenizer(config.model)
    rows = [tokenize_for_training(example, tokenizer, config.max_length) for example in examples]
    model = get_moslora_model(base, adapter_config)
    model.train()
    trainer = MoSLoraTrainer(
        model=model,
        args=training_arguments(config),
        train_dataset=ListDataset(rows),
        data_collator=CausalLMCollator(tokenizer),
        curvature_lr=config.curvature_lr,
        callbacks=[DiagnosticsCallback(model, output)],
    )
    return trainer, model


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, data_dir, tmp_path_factory):
    """Six steps of the default three-expert adapter, logged every two steps, then saved."""
    run = tmp_path_factory.mktemp("diagnostics-run")
    trainer, model = _make_trainer(tiny_model_dir, run, MoSLoraConfig(r=2))
    trainer.train()
    model.save_pretrained(run)
    (run / RUN_CONFIG_NAME).write_text(json.dumps({"log_history": trainer.state.log_history}))
    return SimpleNamespace(run=run, model=model, trainer=trainer)


def _logged(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)


Q_PROJ = "model.layers.0.self_attn.q_proj"
THREE_EXPERTS = {
    "kinds": ["euclidean", "hyperbolic", "spherical"],
    "curvature": [0.0, -0.5, 0.5],
    "router_weight": [0.2, 0.3, 0.5],
}


def _record(step, modules=None):
    """Return a record as DiagnosticsCallback writes it, with one three-expert module by default."""
    return {
        "step": step,
        "epoch": 0.5,
        "loss": 1.0,
        "learning_rate": 0.1,
        "modules": copy.deepcopy(modules if modules is not None else {Q_PROJ: THREE_EXPERTS}),
    }


def _copy_run(source, target):
    """Copy a run folder's files, without its figures, TensorBoard events and checkpoints."""
    ignore = shutil.ignore_patterns("figures", TENSORBOARD_DIR, "checkpoints")
    shutil.copytree(source, target, ignore=ignore)
    return target


def _shorten_router_weight(record):
    values = next(iter(record["modules"].values()))
    values["router_weight"] = values["router_weight"][:-1]


def _null_modules(record):
    record["modules"] = None


def _corrupt_last_record(run, corrupt):
    """Apply ``corrupt`` to the last record of the run's diagnostics and return its line number."""
    path = run / DIAGNOSTICS_NAME
    records = [json.loads(line) for line in path.read_text().splitlines()]
    corrupt(records[-1])
    _write_lines(path, records)
    return len(records)


# ---- the records file -----------------------------------------------------------------------


def test_records_one_per_logging_step(trained_run):
    records = read_diagnostics(trained_run.run)
    logged = _logged(trained_run.trainer)
    assert [record["step"] for record in records] == [2, 4, 6]
    assert [record["step"] for record in records] == [entry["step"] for entry in logged]
    for record, entry in zip(records, logged, strict=True):
        assert record["loss"] == entry["loss"]
        assert record["learning_rate"] == entry["learning_rate"]
        assert record["epoch"] == entry["epoch"]


def test_records_cover_every_module(trained_run):
    model = trained_run.model
    paths = {path for path, _ in model.named_adapter_layers()}
    experts = model.peft_config[model.active_adapter].experts
    assert len(paths) == 2 * 5
    for record in read_diagnostics(trained_run.run):
        assert set(record["modules"]) == paths
        for values in record["modules"].values():
            assert values["kinds"] == experts


def test_last_record_curvature_matches_model(trained_run):
    records = read_diagnostics(trained_run.run)
    final = trained_run.model.curvatures()
    for path, values in records[-1]["modules"].items():
        assert values["curvature"] == final[path]
    # The curvatures were learned, so the first record contains other values.
    changed = [
        path for path, values in records[0]["modules"].items() if values["curvature"] != final[path]
    ]
    assert changed


def test_router_weights_are_distributions(trained_run):
    for record in read_diagnostics(trained_run.run):
        for path, values in record["modules"].items():
            weights = values["router_weight"]
            assert len(weights) == len(values["kinds"]), path
            assert all(0.0 <= weight <= 1.0 for weight in weights), (path, weights)
            assert sum(weights) == pytest.approx(1.0, abs=1e-5), (path, weights)


def test_router_weight_window_mean(tmp_path):
    model = get_moslora_model(tiny_model(), MoSLoraConfig(r=2))
    randomise_adapter(model, std=1.0)
    callback = DiagnosticsCallback(model, tmp_path, tensorboard=False)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for step in range(1, 6):
        ids = torch.randint(0, VOCAB, (2, 7), generator=generator)
        with torch.no_grad():
            model(input_ids=ids)
        seen.append(model.routing_statistics())
        state.global_step = step
        callback.on_step_end(None, state, control)
        if step in (2, 5):
            callback.on_log(None, state, control, logs={"loss": 1.0, "learning_rate": 0.1})
    records = read_diagnostics(tmp_path)
    assert [record["step"] for record in records] == [2, 5]
    for record, window in zip(records, (seen[:2], seen[2:]), strict=True):
        for path, values in record["modules"].items():
            per_step = torch.tensor([stats[path]["mean_probability"] for stats in window])
            expected = per_step.mean(dim=0).tolist()
            assert values["router_weight"] == pytest.approx(expected, rel=1e-6), path


def test_single_expert_records_weight_one(tiny_model_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    config = MoSLoraConfig(r=2, experts=["hyperbolic"])
    trainer, _ = _make_trainer(tiny_model_dir, run, config, max_steps=2, logging_steps=1)
    trainer.train()
    records = read_diagnostics(run)
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        for values in record["modules"].values():
            assert values["router_weight"] == [1.0]
    capsys.readouterr()
    written = plot_run(run, tmp_path / "figures")
    assert sorted(path.name for path in written) == ["curvature.png", "loss.png"]
    assert "one expert" in capsys.readouterr().out
    assert not (tmp_path / "figures" / "expert_usage.png").exists()


# ---- TensorBoard ----------------------------------------------------------------------------


def _event_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / TENSORBOARD_DIR))
    accumulator.Reload()
    return accumulator


def test_tensorboard_has_curvature_tags(trained_run):
    event_files = list((trained_run.run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert event_files
    accumulator = _event_scalars(trained_run.run)
    tags = set(accumulator.Tags()["scalars"])
    last = read_diagnostics(trained_run.run)[-1]
    assert [event.step for event in accumulator.Scalars("train/loss")] == [2, 4, 6]
    for path, values in last["modules"].items():
        for index, kind in enumerate(values["kinds"]):
            curvature_tag = f"curvature/{path}/{index}-{kind}"
            router_tag = f"router/{path}/{index}-{kind}"
            assert router_tag in tags
            if kind == "euclidean":
                assert curvature_tag not in tags
                continue
            assert curvature_tag in tags
            event = accumulator.Scalars(curvature_tag)[-1]
            assert event.step == 6
            assert event.value == pytest.approx(values["curvature"][index], rel=1e-6)


# ---- resuming -------------------------------------------------------------------------------


def test_resume_drops_later_records(tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    settings = dict(max_steps=6, logging_steps=1, save_steps=2)
    trainer, _ = _make_trainer(tiny_model_dir, run, MoSLoraConfig(r=2), **settings)
    original = MoSLoraTrainer.training_step
    calls = {"count": 0}

    def interrupted_step(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] > 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    MoSLoraTrainer.training_step = interrupted_step
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    finally:
        MoSLoraTrainer.training_step = original
    assert [record["step"] for record in read_diagnostics(run)] == [1, 2, 3]

    resumed, _ = _make_trainer(tiny_model_dir, run, MoSLoraConfig(r=2), **settings)
    resumed.train(resume_from_checkpoint=str(run / "checkpoints" / "checkpoint-2"))
    records = read_diagnostics(run)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    steps = [event.step for event in _event_scalars(run).Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_train_begin_truncates_after_step(tmp_path):
    model = get_moslora_model(tiny_model(), MoSLoraConfig(r=2))
    path = tmp_path / DIAGNOSTICS_NAME
    records = [{"step": step, "loss": 1.0, "modules": {}} for step in range(1, 6)]
    _write_lines(path, records, tail='{"step": 6')
    state = TrainerState()
    state.global_step = 3
    DiagnosticsCallback(model, tmp_path, tensorboard=False).on_train_begin(
        None, state, TrainerControl()
    )
    assert [record["step"] for record in read_diagnostics(tmp_path)] == [1, 2, 3]
    assert path.read_text().endswith("\n")
    assert not list(tmp_path.glob(f".{DIAGNOSTICS_NAME}.*"))

    state.global_step = 0
    DiagnosticsCallback(model, tmp_path, tensorboard=False).on_train_begin(
        None, state, TrainerControl()
    )
    assert read_diagnostics(tmp_path) == []


# ---- reading --------------------------------------------------------------------------------


def test_read_skips_unterminated_last_line(tmp_path):
    records = [{"step": 1, "loss": 2.0, "modules": {}}, {"step": 2, "loss": 1.5, "modules": {}}]
    _write_lines(tmp_path / DIAGNOSTICS_NAME, records, tail='{"step": 3, "lo')
    assert read_diagnostics(tmp_path) == records


def test_read_names_malformed_line(tmp_path):
    path = tmp_path / DIAGNOSTICS_NAME
    path.write_text('{"step": 1, "modules": {}}\n{"step": 2, "lo\n{"step": 3, "modules": {}}\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON") as error:
        read_diagnostics(tmp_path)
    assert str(path) in str(error.value)


def test_read_rejects_record_without_step(tmp_path):
    (tmp_path / DIAGNOSTICS_NAME).write_text('{"step": 1, "modules": {}}\n[1, 2]\n')
    with pytest.raises(
        ValueError, match='line 2: a record must be a JSON object with an integer "step"'
    ):
        read_diagnostics(tmp_path)


def _set_module_field(name, value):
    def change(record):
        record["modules"][Q_PROJ][name] = value

    return change


def _set_field(name, value):
    def change(record):
        record[name] = value

    return change


def _set_module(value):
    def change(record):
        record["modules"][Q_PROJ] = value

    return change


MODULE_FIELD = f"modules[{json.dumps(Q_PROJ)}]"

INVALID_STRUCTURES = [
    pytest.param(
        _shorten_router_weight,
        f"field {MODULE_FIELD}.router_weight has 2 values, but {MODULE_FIELD}.kinds lists 3",
        id="short-router-weight",
    ),
    pytest.param(
        _set_module_field("curvature", [0.0, -0.5, 0.5, 0.1]),
        f"field {MODULE_FIELD}.curvature has 4 values",
        id="long-curvature",
    ),
    pytest.param(_null_modules, 'field "modules" must be an object', id="null-modules"),
    pytest.param(_set_field("modules", []), 'field "modules" must be an object', id="list-modules"),
    pytest.param(
        _set_module(None), f"field {MODULE_FIELD} must be an object, not null", id="null-module"
    ),
    pytest.param(
        _set_module_field("kinds", [1, 2, 3]),
        f"field {MODULE_FIELD}.kinds must be a non-empty list of expert kinds",
        id="numeric-kinds",
    ),
    pytest.param(
        _set_module_field("kinds", []),
        f"field {MODULE_FIELD}.kinds must be a non-empty list of expert kinds",
        id="empty-kinds",
    ),
    pytest.param(
        _set_module_field("curvature", "0.5"),
        f"field {MODULE_FIELD}.curvature must be a list of numbers, not the string",
        id="string-curvature",
    ),
    pytest.param(
        _set_module_field("curvature", [0.0, None, 0.5]),
        f"field {MODULE_FIELD}.curvature must be a list of numbers",
        id="null-curvature-value",
    ),
    pytest.param(
        _set_module_field("curvature", None),
        f"field {MODULE_FIELD}.curvature must be a list of numbers, not null",
        id="null-curvature",
    ),
    pytest.param(
        _set_module_field("router_weight", [True, False, False]),
        f"field {MODULE_FIELD}.router_weight must be a list of numbers or null",
        id="boolean-router-weight",
    ),
    pytest.param(
        _set_field("loss", "1.0"), 'field "loss" must be a number or null', id="string-loss"
    ),
    pytest.param(
        _set_field("step", True),
        'a record must be a JSON object with an integer "step"',
        id="bool-step",
    ),
]


@pytest.mark.parametrize(("corrupt", "message"), INVALID_STRUCTURES)
def test_read_rejects_invalid_structure(tmp_path, corrupt, message):
    broken = _record(2)
    corrupt(broken)
    path = tmp_path / DIAGNOSTICS_NAME
    _write_lines(path, [_record(1), broken, _record(3)])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: {message}")):
        read_diagnostics(tmp_path)


def test_read_rejects_changed_kinds(tmp_path):
    changed = _record(2)
    changed["modules"][Q_PROJ]["kinds"] = ["euclidean", "hyperbolic", "free"]
    _write_lines(tmp_path / DIAGNOSTICS_NAME, [_record(1), changed])
    with pytest.raises(ValueError, match=re.escape(f"line 2: field {MODULE_FIELD}.kinds is")):
        read_diagnostics(tmp_path)


def test_read_accepts_null_router_weight(tmp_path):
    # A module that ran no forward pass in a logging window has no router probabilities.
    record = _record(1)
    record["modules"][Q_PROJ]["router_weight"] = None
    _write_lines(tmp_path / DIAGNOSTICS_NAME, [record])
    assert read_diagnostics(tmp_path) == [record]


def test_read_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="made without diagnostics") as error:
        read_diagnostics(tmp_path)
    assert str(tmp_path / DIAGNOSTICS_NAME) in str(error.value)


# ---- plots ----------------------------------------------------------------------------------


def _check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert height >= 200, (path, pixels.shape)
    assert width >= 300, (path, pixels.shape)
    assert pixels.std() > 0, f"{path} is blank"


def test_plot_writes_three_pngs(trained_run, tmp_path):
    output = tmp_path / "figures"
    written = plot_run(trained_run.run, output)
    assert sorted(path.name for path in written) == [
        "curvature.png",
        "expert_usage.png",
        "loss.png",
    ]
    for path in written:
        assert path.parent == output
        _check_png(path)


def test_plot_default_folder_is_figures(trained_run):
    written = plot_run(trained_run.run)
    assert {path.parent for path in written} == {trained_run.run / "figures"}
    assert len(written) == 3


def test_plot_loss_from_run_config(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run.run / RUN_CONFIG_NAME, run / RUN_CONFIG_NAME)
    written = plot_run(run)
    assert [path.name for path in written] == ["loss.png"]
    _check_png(written[0])
    assert f"no {DIAGNOSTICS_NAME}" in capsys.readouterr().out


def test_plot_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder .* not found"):
        plot_run(tmp_path / "missing")


def test_plot_folder_without_run_files(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"neither {DIAGNOSTICS_NAME} nor {RUN_CONFIG_NAME}"
    ):
        plot_run(tmp_path)


@pytest.mark.parametrize(
    ("corrupt", "field"),
    [(_shorten_router_weight, "router_weight has 2 values"), (_null_modules, '"modules"')],
    ids=["short-router-weight", "null-modules"],
)
def test_plot_invalid_record_writes_nothing(trained_run, tmp_path, corrupt, field):
    run = _copy_run(trained_run.run, tmp_path / "run")
    line = _corrupt_last_record(run, corrupt)
    output = tmp_path / "figures"
    output.mkdir()
    (output / "curvature.png").write_bytes(b"earlier figure")
    with pytest.raises(ValueError) as error:
        plot_run(run, output)
    assert f"{run / DIAGNOSTICS_NAME}, line {line}: " in str(error.value)
    assert field in str(error.value)
    assert [path.name for path in output.iterdir()] == ["curvature.png"]
    assert (output / "curvature.png").read_bytes() == b"earlier figure"


def test_plot_writes_pngs_atomically(trained_run, tmp_path, monkeypatch):
    renames = []
    replace = os.replace

    def recording_replace(source, target):
        renames.append((Path(source), Path(target)))
        replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    output = tmp_path / "figures"
    written = plot_run(trained_run.run, output)
    assert sorted(target for _, target in renames) == sorted(written)
    for source, target in renames:
        assert source.parent == target.parent
        assert source.name.startswith(f".{target.name}.")
    # No temporary file is left beside the figures.
    assert sorted(output.iterdir()) == sorted(written)


def _layer_records(layers, steps=3):
    """Records of one q_proj module per layer, every layer with the same curvatures."""
    return [
        _record(step, {f"model.layers.{layer}.self_attn.q_proj": THREE_EXPERTS for layer in layers})
        for step in range(1, steps + 1)
    ]


def test_curvature_lines_of_few_layers_differ():
    from moslora.plot import _draw_curvature

    figure = _draw_curvature(_layer_records([0, 1]))
    plots = [axes for axes in figure.axes if axes.get_lines()]
    assert len(plots) == 2
    for axes in plots:
        lines = axes.get_lines()
        assert len(lines) == 2
        # The lines coincide, so each layer needs its own line style and marker to stay visible.
        assert lines[0].get_linestyle() != lines[1].get_linestyle()
        assert lines[0].get_marker() != lines[1].get_marker()
        assert all(line.get_markerfacecolor() == "none" for line in lines)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["layer 0", "layer 1"]


def test_curvature_of_many_layers_has_colorbar():
    from moslora.plot import _draw_curvature

    figure = _draw_curvature(_layer_records(range(30)))
    assert "layer index" in [axes.get_ylabel() for axes in figure.axes]
    assert not figure.legends
    lines = [line for axes in figure.axes for line in axes.get_lines()]
    assert len(lines) == 2 * 30
    assert all(line.get_alpha() < 1.0 for line in lines)


@pytest.mark.parametrize("router", ["dense", "topk"])
def test_expert_usage_labels_router_probability(router):
    from moslora.plot import _draw_expert_usage

    figure = _draw_expert_usage(_layer_records([0, 1]), router)
    image_axes, colorbar_axes = figure.axes
    title = image_axes.get_title()
    assert "mean router probability" in title
    assert "logging window ending at step 3" in title
    assert "weight" not in title
    assert ("before the top-k selection" in title) == (router == "topk")
    assert colorbar_axes.get_ylabel() == "mean router probability"


# ---- inspecting a saved adapter -------------------------------------------------------------


def test_curvature_from_raw_matches_layer():
    kinds = list(EXPERT_KINDS) * 2
    layer = MoSLoraLinear(torch.nn.Linear(8, 4))
    layer.add_adapter("default", MoSLoraConfig(r=2, experts=kinds, max_curvature=1.5))
    with torch.no_grad():
        layer.moslora_curvature["default"].copy_(torch.linspace(-4.0, 4.0, len(kinds)))
    raw = layer.moslora_curvature["default"].detach()
    expected = layer.curvature().detach()
    assert torch.equal(curvature_from_raw(raw, kinds, 1.5), expected)


def test_split_module_path():
    assert split_module_path("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert split_module_path("model.layers.12.mlp.up_proj") == (12, "mlp.up_proj")
    assert split_module_path("lm_head") == (None, "lm_head")


def test_inspect_matches_model_curvatures(trained_run):
    model = trained_run.model
    summary = json.loads(inspect_adapter(trained_run.run, "json"))
    curvatures = model.curvatures()
    layers = dict(model.named_adapter_layers())
    last = read_diagnostics(trained_run.run)[-1]
    assert summary["diagnostics_step"] == 6
    assert [module["path"] for module in summary["modules"]] != []
    assert {module["path"] for module in summary["modules"]} == set(curvatures)
    for module in summary["modules"]:
        path = module["path"]
        assert [expert["curvature"] for expert in module["experts"]] == pytest.approx(
            curvatures[path], rel=1e-6, abs=1e-7
        )
        assert [expert["kind"] for expert in module["experts"]] == last["modules"][path]["kinds"]
        probabilities = [expert["router_probability"] for expert in module["experts"]]
        assert probabilities == last["modules"][path]["router_weight"]
        assert module["input_scale"] == pytest.approx(
            float(layers[path].input_scale().detach()), rel=1e-6
        )
        assert (module["layer"], module["module"]) == split_module_path(path)


def test_inspect_table_rows(trained_run, tmp_path):
    table = inspect_adapter(trained_run.run)
    lines = table.splitlines()
    paths = list(trained_run.model.curvatures())
    assert "0:euclidean k" in lines[3]
    assert "2:spherical w" in lines[3]
    assert len(lines) == 4 + len(paths)
    rows = [line.split() for line in lines[4:]]
    assert sorted((int(row[0]), row[1]) for row in rows) == sorted(
        split_module_path(path) for path in paths
    )
    assert all("-" not in row[2:] for row in rows)

    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy(trained_run.run / name, bare / name)
    bare_rows = [line.split() for line in inspect_adapter(bare).splitlines()[4:]]
    # Without diagnostics every router probability column shows "-".
    assert all(row[3:-1:2] == ["-"] * 3 for row in bare_rows)


def test_inspect_labels_each_number(trained_run):
    lines = inspect_adapter(trained_run.run).splitlines()
    assert lines[1] == "k: curvature in the saved adapter"
    assert lines[2] == (
        f"w: mean router probability over the logging window ending at step 6 "
        f"(from {DIAGNOSTICS_NAME})"
    )


def _saved_adapter(folder, config):
    """Save an untrained adapter of ``config`` and write one diagnostics record for it."""
    model = get_moslora_model(tiny_model(), config)
    model.save_pretrained(folder)
    values = {
        "kinds": list(config.experts),
        "curvature": [0.0] * config.num_experts,
        "router_weight": [0.25, 0.25, 0.5],
    }
    modules = {path: values for path, _ in model.named_adapter_layers()}
    _write_lines(folder / DIAGNOSTICS_NAME, [_record(5, modules)])
    return folder


def test_inspect_topk_router_probability(tmp_path):
    folder = _saved_adapter(tmp_path, MoSLoraConfig(r=2, router="topk", top_k=1))
    note = inspect_adapter(folder).splitlines()[2]
    assert note.startswith("w: mean router probability (softmax before the top-k selection)")
    assert "ending at step 5" in note
    summary = json.loads(inspect_adapter(folder, "json"))
    assert summary["router"] == "topk"
    probabilities = [expert["router_probability"] for expert in summary["modules"][0]["experts"]]
    assert probabilities == [0.25, 0.25, 0.5]


@pytest.mark.parametrize(
    ("corrupt", "field"),
    [(_shorten_router_weight, "router_weight has 2 values"), (_null_modules, '"modules"')],
    ids=["short-router-weight", "null-modules"],
)
def test_inspect_invalid_record_names_line(trained_run, tmp_path, corrupt, field):
    run = _copy_run(trained_run.run, tmp_path / "run")
    line = _corrupt_last_record(run, corrupt)
    with pytest.raises(ValueError) as error:
        inspect_adapter(run)
    assert f"{run / DIAGNOSTICS_NAME}, line {line}: " in str(error.value)
    assert field in str(error.value)


def test_inspect_rejects_records_of_other_experts(tmp_path):
    folder = _saved_adapter(tmp_path, MoSLoraConfig(r=2))
    records = read_diagnostics(folder)
    for values in records[0]["modules"].values():
        values["kinds"] = ["euclidean", "hyperbolic", "free"]
    _write_lines(folder / DIAGNOSTICS_NAME, records)
    with pytest.raises(ValueError, match="the records belong to another adapter"):
        inspect_adapter(folder)


def _peft_adapter(folder, use_dora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    model = get_peft_model(tiny_model(), config)
    model.save_pretrained(str(folder))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return folder, trainable


@pytest.mark.parametrize(("use_dora", "label"), [(False, "LoRA"), (True, "DoRA")])
def test_inspect_peft_summary(tmp_path, use_dora, label):
    folder, trainable = _peft_adapter(tmp_path / "peft", use_dora)
    line = inspect_adapter(folder)
    assert "\n" not in line
    assert f"PEFT {label} adapter" in line
    assert "r=4" in line
    assert "target modules q_proj, v_proj" in line
    assert f"{trainable:,d} trainable parameters" in line
    summary = json.loads(inspect_adapter(folder, "json"))
    assert summary["trainable_parameters"] == trainable
    assert summary["peft_type"] == label


def test_inspect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter folder .* not found"):
        inspect_adapter(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_NAME} not found"):
        inspect_adapter(tmp_path)
    with pytest.raises(ValueError, match="output format 'yaml' is invalid"):
        inspect_adapter(tmp_path, "yaml")


# ---- the command line -----------------------------------------------------------------------


def test_cli_plot_prints_paths(trained_run, tmp_path, capsys):
    output = tmp_path / "figures"
    assert main(["plot", str(trained_run.run), "--output", str(output)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("curvature.png", "expert_usage.png", "loss.png"):
        assert str(output / name) in printed
        assert (output / name).is_file()


def test_cli_inspect_table_and_json(trained_run, capsys):
    assert main(["inspect", str(trained_run.run)]) == 0
    table = capsys.readouterr().out
    assert "input scale" in table
    assert "self_attn.q_proj" in table
    assert main(["inspect", str(trained_run.run), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["modules"]) == len(trained_run.model.curvatures())


@pytest.mark.parametrize("command", ["plot", "inspect"])
def test_cli_missing_folder_exits_2(tmp_path, capsys, command):
    missing = tmp_path / "missing"
    assert main([command, str(missing)]) == 2
    error = capsys.readouterr().err
    assert f"moslora {command}: error:" in error
    assert f"{missing} not found" in error


@pytest.mark.parametrize("command", ["plot", "inspect"])
def test_cli_file_instead_of_folder(tmp_path, capsys, command):
    file = tmp_path / "afile.txt"
    file.write_text("text\n")
    assert main([command, str(file)]) == 2
    error = capsys.readouterr().err
    assert f"{file} is a file, but" in error
    assert "folder is expected" in error
    assert "not found" not in error


def test_cli_plot_output_is_file(trained_run, tmp_path, capsys):
    file = tmp_path / "afile.txt"
    file.write_text("text\n")
    assert main(["plot", str(trained_run.run), "--output", str(file)]) == 2
    error = capsys.readouterr().err
    assert f"output folder {file} is an existing file" in error
    assert "Errno" not in error
    assert file.read_text() == "text\n"


@pytest.mark.parametrize(
    ("corrupt", "command"),
    [
        (_shorten_router_weight, "plot"),
        (_shorten_router_weight, "inspect"),
        (_null_modules, "plot"),
    ],
    ids=["short-router-weight-plot", "short-router-weight-inspect", "null-modules-plot"],
)
def test_cli_invalid_record_exits_2(trained_run, tmp_path, capsys, corrupt, command):
    run = _copy_run(trained_run.run, tmp_path / "run")
    line = _corrupt_last_record(run, corrupt)
    assert main([command, str(run)]) == 2
    error = capsys.readouterr().err
    assert f"moslora {command}: error: {run / DIAGNOSTICS_NAME}, line {line}: " in error


def _train_args(model_dir, output, *extra):
    return [
        "train",
        "--model", str(model_dir),
        "--data", "mawps",
        "--limit", "8",
        "--batch-size", "2",
        "--max-length", "192",
        "--max-steps", "4",
        "--logging-steps", "2",
        "--no-progress",
        "--output", str(output),
        *extra,
    ]  # fmt: skip


def test_cli_train_writes_diagnostics(tiny_model_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, run, "--r", "2")) == 0
    record = json.loads((run / RUN_CONFIG_NAME).read_text())
    records = read_diagnostics(run)
    assert [entry["step"] for entry in records] == [2, 4]
    for path, values in records[-1]["modules"].items():
        assert values["curvature"] == record["curvature"][path]
    assert list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))

    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(
        str(run / "figures" / name) for name in ("curvature.png", "expert_usage.png", "loss.png")
    )
    assert main(["inspect", str(run)]) == 0
    assert "logging window ending at step 4 (from diagnostics.jsonl)" in capsys.readouterr().out


def test_cli_train_no_tensorboard(tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, run, "--r", "2", "--no-tensorboard")) == 0
    assert [entry["step"] for entry in read_diagnostics(run)] == [2, 4]
    assert not (run / TENSORBOARD_DIR).exists()


@pytest.mark.parametrize(("method", "label"), [("lora", "LoRA"), ("dora", "DoRA")])
def test_cli_peft_run_plot_and_inspect(tiny_model_dir, data_dir, tmp_path, capsys, method, label):
    run = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, run, "--method", method, "--r", "4")) == 0
    assert not (run / DIAGNOSTICS_NAME).exists()
    record = json.loads((run / RUN_CONFIG_NAME).read_text())

    capsys.readouterr()
    written = plot_run(run)
    assert [path.name for path in written] == ["loss.png"]
    _check_png(written[0])
    assert f"PEFT {label} run" in capsys.readouterr().out

    assert main(["inspect", str(run)]) == 0
    line = capsys.readouterr().out.strip()
    assert f"PEFT {label} adapter" in line
    assert "r=4" in line
    assert f"{record['trainable_parameters']:,d} trainable parameters" in line


@pytest.fixture(scope="module")
def unlogged_run(tiny_model_dir, data_dir, tmp_path_factory):
    """A finished two-step run that logs every ten steps, so it never logged a step."""
    run = tmp_path_factory.mktemp("unlogged") / "run"
    extra = ("--r", "2", "--max-steps", "2", "--logging-steps", "10")
    assert main(_train_args(tiny_model_dir, run, *extra)) == 0
    return run


def test_cli_plot_run_without_logged_step(unlogged_run, capsys):
    capsys.readouterr()
    assert main(["plot", str(unlogged_run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error = captured.err.strip().splitlines()
    assert len(error) == 1
    assert "the run finished at step 2 before its first logging step" in error[0]
    assert "no step was logged" in error[0]
    assert "lower --logging-steps" in error[0]
    assert not (unlogged_run / "figures").exists()


def test_cli_checkpoint_points_to_run(unlogged_run, capsys):
    checkpoint = unlogged_run / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_dir()
    capsys.readouterr()
    assert main(["plot", str(checkpoint)]) == 2
    error = capsys.readouterr().err
    assert f"{checkpoint} is a checkpoint folder" in error
    assert f"they are in the run folder {unlogged_run}," in error

    assert main(["inspect", str(checkpoint)]) == 0
    note = capsys.readouterr().out.splitlines()[2]
    assert note == (
        f"w: - ({DIAGNOSTICS_NAME} is written to the run folder {unlogged_run}, "
        "not to checkpoint folders)"
    )
