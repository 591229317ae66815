"""Two-process DDP training (gloo on CPU) through `accelerate launch` against one process."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moslora.config import WEIGHTS_NAME
from moslora.train import RUN_CONFIG_NAME

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_flags(model_dir, output, batch_size):
    return [
        "train", "--model", str(model_dir), "--data", "mawps", "--limit", "16",
        "--batch-size", str(batch_size), "--max-steps", "4", "--logging-steps", "1",
        "--lora-dropout", "0", "--lr", "0.01", "--no-progress", "--output", str(output),
        # The Switch aux loss is a product of two batch means, so each process's value on its
        # half batch differs from the value on the whole batch. Without it the runs are equal.
        "--router-aux-loss-coef", "0",
    ]  # fmt: skip


def _losses(run_dir):
    record = json.loads((run_dir / RUN_CONFIG_NAME).read_text())
    return [entry["loss"] for entry in record["log_history"] if "loss" in entry]


@pytest.mark.skipif(
    shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH"
)
def test_ddp_two_processes_match_one_process(tiny_model_dir, tmp_path, data_dir):
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-m", "moslora.cli", *_train_flags(tiny_model_dir, single, 4)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    ddp = tmp_path / "ddp"
    launch = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        "-m", "moslora.cli", *_train_flags(tiny_model_dir, ddp, 2),
    ]  # fmt: skip
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each process gets 2 examples of a global batch of 4, so the batches equal one process's.
    single_losses, ddp_losses = _losses(single), _losses(ddp)
    assert len(ddp_losses) == 4
    torch.testing.assert_close(
        torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-3, atol=1e-3
    )
    # AdamW turns the rounding differences of the all-reduce into differences of up to one
    # step (lr = 0.01) in elements whose gradient is close to zero, so the weights are compared
    # as a whole: their relative distance.
    single_weights, ddp_weights = load_file(single / WEIGHTS_NAME), load_file(ddp / WEIGHTS_NAME)
    assert single_weights.keys() == ddp_weights.keys()
    expected = torch.cat([value.flatten() for value in single_weights.values()])
    actual = torch.cat([ddp_weights[key].flatten() for key in single_weights])
    assert float((actual - expected).norm() / expected.norm()) < 1e-2
