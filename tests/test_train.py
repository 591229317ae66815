"""Training end to end on a tiny model folder: the CLI, checkpoints, resume, aux loss, reload."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moslora import MoSLoraConfig, MoSLoraModel
from moslora.cli import main
from moslora.config import CONFIG_NAME, WEIGHTS_NAME
from moslora.train import RUN_CONFIG_NAME, MoSLoraTrainer, TrainConfig, train


def _train_args(model_dir, output, *extra):
    return [
        "train",
        "--model", str(model_dir),
        "--data", "mawps",
        "--limit", "24",
        "--batch-size", "4",
        "--max-length", "192",
        "--no-progress",
        "--output", str(output),
        *extra,
    ]  # fmt: skip


def test_train_cli_writes_run_folder(tiny_model_dir, tmp_path, data_dir):
    output = tmp_path / "run"
    code = main(
        _train_args(tiny_model_dir, output, "--max-steps", "3", "--logging-steps", "1", "--r", "2")
    )
    assert code == 0
    assert (output / WEIGHTS_NAME).is_file()
    assert (output / CONFIG_NAME).is_file()
    record = json.loads((output / RUN_CONFIG_NAME).read_text())
    assert record["finished"] is True
    assert record["train"]["max_steps"] == 3
    assert record["adapter"]["r"] == 2
    assert record["examples"] == 24
    assert record["trainable_parameters"] > 0
    logged = [entry for entry in record["log_history"] if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert "aux_loss" in entry
        assert "curvature_hyperbolic" in entry
        assert "curvature_spherical" in entry
        assert "learning_rate" in entry
        # Both optimizer groups follow one schedule: the logged rates keep the peaks' ratio.
        assert entry["curvature_lr"] == pytest.approx(entry["learning_rate"] * 1e-2 / 3e-4)


def test_train_refuses_existing_adapter(tiny_model_dir, tmp_path, data_dir, capsys):
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, output, "--max-steps", "1")) == 0
    assert main(_train_args(tiny_model_dir, output, "--max-steps", "1")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_train_recipe_file_and_flag_override(tiny_model_dir, tmp_path, data_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("experts: [hyperbolic, hyperbolic]\nr: 3\nmax_steps: 1\nrouter: topk\n")
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, output, "--config", str(recipe), "--r", "2")) == 0
    saved = json.loads((output / CONFIG_NAME).read_text())
    assert saved["experts"] == ["hyperbolic", "hyperbolic"]
    assert saved["router"] == "topk"
    assert saved["r"] == 2


def test_train_recipe_unknown_key(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rank: 3\n")
    assert main(_train_args(tiny_model_dir, tmp_path / "run", "--config", str(recipe))) == 2
    assert "unknown setting(s) rank" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--r", "0"], "r must be a positive integer"),
        (["--experts", "euclidean,toroidal"], "unknown expert kind 'toroidal'"),
        (["--init-curvature", "hyperbolic=0.5"], "must be negative"),
        (["--data", "svamp", "--split", "test"], "gsm8k or mawps"),
        (["--lr", "-1"], "--lr must be a positive number"),
    ],
)
def test_train_cli_bad_values(tiny_model_dir, tmp_path, data_dir, capsys, flags, message):
    assert main(_train_args(tiny_model_dir, tmp_path / "run", "--max-steps", "1", *flags)) == 2
    assert message in capsys.readouterr().err


def test_curvature_learning_rate_group(tiny_model_dir, tmp_path, data_dir):
    config = TrainConfig(
        output=str(tmp_path / "run"), model=str(tiny_model_dir), limit=8, max_steps=1,
        batch_size=4, lr=1e-4, curvature_lr=5e-2, warmup_ratio=0.0, progress=False,
    )  # fmt: skip
    captured = {}
    original = MoSLoraTrainer.create_optimizer

    def spy(self, model=None):
        optimizer = original(self, model)
        captured["groups"] = [
            (group["lr"], len(group["params"])) for group in optimizer.param_groups
        ]
        return optimizer

    MoSLoraTrainer.create_optimizer = spy
    try:
        train(config, MoSLoraConfig())
    finally:
        MoSLoraTrainer.create_optimizer = original
    rates = [rate for rate, _ in captured["groups"]]
    assert 5e-2 in rates
    assert 1e-4 in rates
    # One curvature vector and one input scale per adapted module: 5 modules in 2 layers.
    assert dict((rate, count) for rate, count in captured["groups"])[5e-2] == 2 * 5 * 2


def _interrupt_after(steps):
    original = MoSLoraTrainer.training_step
    calls = {"count": 0}

    def step(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] > steps:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    return original, step


def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, data_dir):
    def config(output, resume=False):
        return TrainConfig(
            output=str(output), model=str(tiny_model_dir), limit=16, max_steps=6,
            batch_size=4, save_steps=2, lr=5e-3, progress=False, resume=resume,
        )  # fmt: skip

    adapter = MoSLoraConfig(r=2, lora_dropout=0.1)
    train(config(tmp_path / "full"), adapter)

    original, interrupted = _interrupt_after(3)
    MoSLoraTrainer.training_step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config(tmp_path / "split"), MoSLoraConfig(r=2, lora_dropout=0.1))
    finally:
        MoSLoraTrainer.training_step = original
    assert not (tmp_path / "split" / WEIGHTS_NAME).exists()
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-2").is_dir()
    train(config(tmp_path / "split", resume=True), MoSLoraConfig(r=2, lora_dropout=0.1))

    full = load_file(tmp_path / "full" / WEIGHTS_NAME)
    resumed = load_file(tmp_path / "split" / WEIGHTS_NAME)
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_fails(tiny_model_dir, tmp_path, data_dir, capsys):
    assert main(_train_args(tiny_model_dir, tmp_path / "run", "--resume")) == 2
    assert "no complete checkpoint found" in capsys.readouterr().err


def test_aux_loss_reaches_training_loss(tiny_model_dir, tmp_path, data_dir):
    # With a huge coefficient the router is pushed towards uniform use within a few steps.
    def run(coefficient, name):
        config = TrainConfig(
            output=str(tmp_path / name), model=str(tiny_model_dir), limit=16, max_steps=4,
            batch_size=4, lr=5e-2, warmup_ratio=0.0, progress=False, logging_steps=1,
        )  # fmt: skip
        return train(config, MoSLoraConfig(r=2, router_aux_loss_coef=coefficient))

    plain = run(0.0, "plain")
    pushed = run(100.0, "pushed")
    plain_losses = [entry["loss"] for entry in plain["log_history"] if "loss" in entry]
    pushed_losses = [entry["loss"] for entry in pushed["log_history"] if "loss" in entry]
    # The reported loss includes 100 * aux (at least 100, since aux >= 1).
    assert min(pushed_losses) > max(plain_losses) + 50


def test_trained_adapter_reloads_in_new_process(
    tiny_model_dir, tmp_path, data_dir, smollm2_tokenizer
):
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, output, "--max-steps", "2", "--lr", "0.05")) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = MoSLoraModel.from_pretrained(base, output)
    ids = torch.tensor([smollm2_tokenizer("Tom has 3 apples and buys 4 more.")["input_ids"]])
    expected = model(ids).logits
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert not torch.equal(expected, reference)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = (
        "import torch, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "from moslora import MoSLoraModel\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        f"model = MoSLoraModel.from_pretrained(base, {str(output)!r})\n"
        "sys.exit(0 if torch.equal(model(expected['ids']).logits, expected['logits']) else 1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


def test_eval_cli_base_and_adapter(tiny_model_dir, tmp_path, data_dir):
    adapter = tmp_path / "adapter"
    assert main(_train_args(tiny_model_dir, adapter, "--max-steps", "1")) == 0
    common = [
        "--data",
        "mawps",
        "--limit",
        "4",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    base_out, tuned_out = tmp_path / "base", tmp_path / "tuned"
    assert main(["eval", "--model", str(tiny_model_dir), "--output", str(base_out), *common]) == 0
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(adapter),
                "--model",
                str(tiny_model_dir),
                "--output",
                str(tuned_out),
                *common,
            ]
        )
        == 0
    )
    for folder, expected_adapter in ((base_out, None), (tuned_out, str(adapter))):
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["count"] == 4
        assert summary["adapter"] == expected_adapter
        assert 0.0 <= summary["accuracy"] <= 1.0
        lines = (folder / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 4


def test_eval_cli_exclude_reports_dropped(tiny_model_dir, tmp_path, data_dir):
    output = tmp_path / "eval"
    flags = ["--data", "mawps", "--exclude", "mawps:train", "--limit", "2", "--max-new-tokens", "2"]
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--output",
                str(output),
                "--no-progress",
                *flags,
            ]
        )
        == 0
    )
    summary = json.loads((output / "summary.json").read_text())
    assert summary["excluded_overlap"] == {"mawps:train": 28}


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "moslora.cli", "train", "--help"],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert result.returncode == 0
    assert "--curvature-lr" in result.stdout
    assert "--experts" in result.stdout


def test_train_bfloat16_end_to_end(tiny_model_dir, tmp_path, data_dir):
    output = tmp_path / "run"
    assert (
        main(
            _train_args(
                tiny_model_dir,
                output,
                "--max-steps",
                "2",
                "--dtype",
                "bfloat16",
                "--logging-steps",
                "1",
            )
        )
        == 0
    )
    record = json.loads((output / RUN_CONFIG_NAME).read_text())
    losses = [entry["loss"] for entry in record["log_history"] if "loss" in entry]
    assert len(losses) == 2
    assert all(loss == loss and loss < 1e4 for loss in losses)
    # Adapter tensors stay float32 in a bfloat16 model.
    assert all(
        tensor.dtype == torch.float32 for tensor in load_file(output / WEIGHTS_NAME).values()
    )


def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, data_dir):
    import signal
    import time

    from moslora.train import CHECKPOINT_COMPLETE

    settings = dict(
        model=str(tiny_model_dir),
        limit=16,
        max_steps=10,
        batch_size=4,
        max_length=192,
        save_steps=1,
        lr=5e-3,
        progress=False,
    )
    train(TrainConfig(output=str(tmp_path / "full"), **settings), MoSLoraConfig(r=2))

    killed = tmp_path / "killed"
    flags = ["--max-steps", "10", "--save-steps", "1", "--lr", "0.005", "--r", "2", "--limit", "16"]
    command = [sys.executable, "-m", "moslora.cli", *_train_args(tiny_model_dir, killed, *flags)]
    log = tmp_path / "killed.log"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    marker = killed / "checkpoints" / "checkpoint-3" / CHECKPOINT_COMPLETE
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, (
        f"training ended before it could be killed: {log.read_text()[-2000:]}"
    )
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (killed / WEIGHTS_NAME).exists()

    train(TrainConfig(output=str(killed), resume=True, **settings), MoSLoraConfig(r=2))
    full = load_file(tmp_path / "full" / WEIGHTS_NAME)
    resumed = load_file(killed / WEIGHTS_NAME)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_resume_skips_incomplete_checkpoint(tmp_path):
    from moslora.train import CHECKPOINT_COMPLETE, last_complete_checkpoint

    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
    for step in (2, 4):
        (folder / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text(str(step))
    assert last_complete_checkpoint(folder) == str(folder / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_recipe_values_converted_like_flags(tiny_model_dir, tmp_path, data_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "lr: 3e-4\nexperts: euclidean,hyperbolic\ntarget_modules: q_proj,v_proj\n"
        "init_curvature: {hyperbolic: -0.25}\nmax_steps: 1\n"
    )
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, output, "--config", str(recipe))) == 0
    record = json.loads((output / RUN_CONFIG_NAME).read_text())
    assert record["train"]["lr"] == 3e-4
    assert record["adapter"]["experts"] == ["euclidean", "hyperbolic"]
    assert record["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert record["adapter"]["init_curvature"]["hyperbolic"] == -0.25


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("epochs: three\n", "epochs must be a number"),
        ("calibrate: maybe\n", "calibrate must be true or false"),
        ("init_curvature: -0.5\n", "init_curvature must be a mapping"),
    ],
)
def test_recipe_wrong_types_named(tiny_model_dir, tmp_path, capsys, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    assert main(_train_args(tiny_model_dir, tmp_path / "run", "--config", str(path))) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-modules", "["], "is not a valid regular expression"),
        (["--epochs", "inf"], "--epochs must be a finite number"),
        (["--weight-decay", "-1"], "--weight-decay must be a non-negative number"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a non-negative number"),
        (["--seed", "-1"], "--seed must be from 0"),
        (["--save-total-limit", "1"], "--save-total-limit must be at least 2"),
    ],
)
def test_train_cli_more_bad_values(tiny_model_dir, tmp_path, data_dir, capsys, flags, message):
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, output, "--max-steps", "1", *flags)) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_unfinished_run_not_silently_replaced(tiny_model_dir, tmp_path, data_dir, capsys):
    output = tmp_path / "run"
    original, interrupted = _interrupt_after(3)
    MoSLoraTrainer.training_step = interrupted
    try:
        # The CLI turns the interruption into exit status 130.
        assert (
            main(_train_args(tiny_model_dir, output, "--max-steps", "6", "--save-steps", "2"))
            == 130
        )
    finally:
        MoSLoraTrainer.training_step = original
    assert main(_train_args(tiny_model_dir, output, "--max-steps", "6")) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert (output / "checkpoints" / "checkpoint-2").is_dir()


def test_resume_with_other_settings_named(tiny_model_dir, tmp_path, data_dir, capsys):
    output = tmp_path / "run"
    original, interrupted = _interrupt_after(3)
    MoSLoraTrainer.training_step = interrupted
    try:
        flags = ["--max-steps", "6", "--save-steps", "2", "--r", "4"]
        assert main(_train_args(tiny_model_dir, output, *flags)) == 130
    finally:
        MoSLoraTrainer.training_step = original
    assert (
        main(_train_args(tiny_model_dir, output, "--max-steps", "6", "--resume", "--r", "2")) == 2
    )
    assert "was made with r=4 (now 2)" in capsys.readouterr().err


def test_overwrite_removes_previous_adapter_first(tiny_model_dir, tmp_path, data_dir):
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, output, "--max-steps", "1", "--r", "4")) == 0
    original, interrupted = _interrupt_after(1)
    MoSLoraTrainer.training_step = interrupted
    try:
        # The CLI turns the interruption into exit status 130.
        assert (
            main(_train_args(tiny_model_dir, output, "--max-steps", "4", "--overwrite", "--r", "2"))
            == 130
        )
    finally:
        MoSLoraTrainer.training_step = original
    # The interrupted replacement leaves no adapter that would load as the old one.
    assert not (output / CONFIG_NAME).exists()
    assert not (output / WEIGHTS_NAME).exists()


def test_relative_model_path_recorded_absolute(tiny_model_dir, tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    output = tmp_path / "run"
    assert main(_train_args(tiny_model_dir.name, output, "--max-steps", "1")) == 0
    saved = json.loads((output / CONFIG_NAME).read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir.resolve())


def test_eval_names_missing_recorded_base(tiny_model_dir, tmp_path, data_dir, capsys):
    adapter = tmp_path / "adapter"
    assert main(_train_args(tiny_model_dir, adapter, "--max-steps", "1")) == 0
    config_path = adapter / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    config_path.write_text(json.dumps(config))
    assert (
        main(
            ["eval", "--adapter", str(adapter), "--output", str(tmp_path / "eval"), "--limit", "1"]
        )
        == 2
    )
    message = capsys.readouterr().err
    assert "the base model recorded in" in message
    assert "pass --model" in message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--r", "0"], "r must be a positive integer"),
        (["--test-limit", "0"], "--test-limit must be at least 1"),
    ],
)
def test_quickstart_checks_settings_first(tmp_path, capsys, flags, message):
    output = tmp_path / "quickstart"
    assert main(["quickstart", "--output", str(output), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (output / "eval-base").exists()
