"""Fine-tuning with the Hugging Face Trainer: the router's auxiliary loss, a separate
learning rate for curvatures, adapter-only checkpoints and resumption."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import moslora
from moslora.config import CONFIG_NAME, WEIGHTS_NAME, field_help
from moslora.files import write_json_atomic
from moslora.methods import (
    adapter_config_for,
    adapter_settings,
    attach_adapter,
    check_method,
    is_peft_config,
    method_of,
    read_adapter_config,
    summed_rank,
)
from moslora.model import MoSLoraModel

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
CHECKPOINTS = "checkpoints"
# Written by the diagnostics callback and `moslora plot`; removed with the run on --overwrite.
DIAGNOSTICS_NAME = "diagnostics.jsonl"
TENSORBOARD_DIR = "tensorboard"
FIGURES_DIR = "figures"
# Written into a checkpoint folder after everything else in it. The Trainer writes checkpoint
# files one by one, so a folder without this marker may be missing its optimizer state.
CHECKPOINT_COMPLETE = "moslora-checkpoint-complete"


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run (every field is also a `moslora train` flag)."""

    output: str | None = field(
        default=None, metadata=field_help("Run folder: adapter, run configuration, checkpoints.")
    )
    method: str = field(
        default="moslora",
        metadata=field_help(
            "Fine-tuning method: moslora (the mixture of --experts), the single-space ablations "
            "euclidean, hyperbolic and spherical, hyplora (one Lorentz-model hyperbolic expert), "
            "or PEFT's lora and dora."
        ),
    )
    total_rank: int | None = field(
        default=None,
        metadata=field_help(
            "Summed rank of all experts of a module (the rank of lora and dora), to match "
            "parameter budgets across methods: sets --r to this divided by the number of experts "
            "and changes --lora-alpha by the same factor as --r."
        ),
    )
    model: str | None = field(
        default=None,
        metadata=field_help(
            "Base model: a local Hugging Face folder or Hub id; default SmolLM2-135M-Instruct."
        ),
    )
    data: str = field(
        default="mawps",
        metadata=field_help(
            "Training data: gsm8k, mawps, a .json/.jsonl file or a folder of splits."
        ),
    )
    split: str = field(default="train", metadata=field_help("Split of --data to train on."))
    data_dir: str | None = field(
        default=None, metadata=field_help("Folder of the named datasets; default $MOSLORA_DATA.")
    )
    limit: int | None = field(
        default=None, metadata=field_help("Use only the first N training examples.")
    )
    max_length: int = field(
        default=256, metadata=field_help("Maximum tokens per example (prompt plus response).")
    )
    epochs: float = field(default=1.0, metadata=field_help("Passes over the training data."))
    max_steps: int = field(
        default=-1,
        metadata=field_help("Stop after this many optimizer steps (overrides --epochs)."),
    )
    batch_size: int = field(default=8, metadata=field_help("Examples per device per forward pass."))
    gradient_accumulation: int = field(
        default=1, metadata=field_help("Forward passes accumulated per optimizer step.")
    )
    lr: float = field(
        default=3e-4, metadata=field_help("Peak learning rate of A, B and the router.")
    )
    curvature_lr: float = field(
        default=1e-2,
        metadata=field_help("Peak learning rate of the curvature and input-scale parameters."),
    )
    weight_decay: float = field(
        default=0.0, metadata=field_help("AdamW weight decay of A, B and the router weights.")
    )
    warmup_ratio: float = field(
        default=0.05, metadata=field_help("Fraction of steps with a linear learning-rate warm-up.")
    )
    max_grad_norm: float = field(
        default=1.0, metadata=field_help("Gradient clipping norm; 0 is off.")
    )
    dtype: str = field(default="float32", metadata=field_help("Model dtype: float32 or bfloat16."))
    seed: int = field(
        default=42, metadata=field_help("Seed of adapter init, data order and dropout.")
    )
    logging_steps: int = field(default=10, metadata=field_help("Log every N optimizer steps."))
    save_steps: int = field(default=50, metadata=field_help("Checkpoint every N optimizer steps."))
    save_total_limit: int = field(
        default=2,
        metadata=field_help(
            "Checkpoints kept in the run folder, at least 2, so that a save cut short by a kill "
            "always leaves an earlier complete one."
        ),
    )
    resume: bool = field(
        default=False, metadata=field_help("Continue from the last checkpoint in --output.")
    )
    overwrite: bool = field(
        default=False, metadata=field_help("Replace a finished adapter already in --output.")
    )
    calibrate: bool = field(
        default=True,
        metadata=field_help(
            "Set each layer's input scale to the median input norm of a first batch."
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=field_help("Recompute activations in the backward pass to save memory."),
    )
    tensorboard: bool = field(
        default=True,
        metadata=field_help(
            "MoSLoRA methods: write loss, curvatures and router weights to TensorBoard in "
            "<output>/tensorboard (lora and dora runs write none)."
        ),
    )
    progress: bool = field(default=True, metadata=field_help("Show a progress bar."))

    def validate(self) -> None:
        if not self.output:
            raise ValueError("--output is required: the folder the run writes its adapter to")
        check_method(self.method)
        positive = {
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "gradient_accumulation": self.gradient_accumulation,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.save_total_limit < 2:
            raise ValueError(f"--save-total-limit must be at least 2, got {self.save_total_limit}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if not math.isfinite(self.epochs):
            raise ValueError(f"--epochs must be a finite number, got {self.epochs}")
        if not (self.epochs > 0 or self.max_steps > 0):
            raise ValueError("set --epochs above 0 or --max-steps to a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f"--weight-decay must be a non-negative number, got {self.weight_decay}"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(
                f"--max-grad-norm must be a non-negative number (0 turns clipping off), "
                f"got {self.max_grad_norm}"
            )
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be from 0 to 2**32 - 1, got {self.seed}")
        for name in ("lr", "curvature_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive number, got {value}"
                )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"--dtype must be float32 or bfloat16 for training, got {self.dtype!r}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")


class ListDataset(Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


class MoSLoraTrainer(Trainer):
    """A Trainer that adds the router's load-balancing loss and saves only the adapter.

    It also trains PEFT LoRA and DoRA models, which have no router and no curvatures, so that
    every method runs through the same optimizer set-up, checkpoints and resumption.
    """

    def __init__(self, *args: Any, curvature_lr: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.curvature_lr = curvature_lr
        self._aux_total = 0.0
        self._aux_count = 0

    def _adapter_model(self):
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, (MoSLoraModel, PeftModel)):
            raise TypeError(
                f"MoSLoraTrainer trains a MoSLoraModel or a PEFT model, got {type(model).__name__}"
            )
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        adapter_model = self._adapter_model()
        if not isinstance(adapter_model, MoSLoraModel):
            return (loss, outputs) if return_outputs else loss
        coefficient = adapter_model.peft_config[adapter_model.active_adapter].router_aux_loss_coef
        aux = adapter_model.router_aux_loss()
        if aux is not None and model.training:
            self._aux_total += float(aux.detach())
            self._aux_count += 1
            if coefficient > 0:
                term = coefficient * aux.to(loss.device)
                if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                    # The language-model loss is already normalised over the accumulated batch,
                    # so the Trainer will not divide it; the per-batch aux loss needs dividing.
                    term = term / self.current_gradient_accumulation_steps
                loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        groups: dict[str, list[torch.nn.Parameter]] = {
            "weights": [],
            "no_decay": [],
            "curvature": [],
        }
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if "moslora_curvature" in name or "moslora_log_scale" in name:
                groups["curvature"].append(parameter)
            elif name.endswith(".bias"):
                groups["no_decay"].append(parameter)
            else:
                groups["weights"].append(parameter)
        args = self.args
        curvature_lr = self.curvature_lr if self.curvature_lr is not None else args.learning_rate
        param_groups = [
            {"params": groups["weights"], "weight_decay": args.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
            {"params": groups["curvature"], "weight_decay": 0.0, "lr": curvature_lr},
        ]
        param_groups = [group for group in param_groups if group["params"]]
        self.optimizer = torch.optim.AdamW(
            param_groups,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        model = self._adapter_model()
        if "loss" in logs and isinstance(model, MoSLoraModel):
            if self._aux_count:
                logs["aux_loss"] = round(self._aux_total / self._aux_count, 4)
                self._aux_total, self._aux_count = 0.0, 0
            for kind, value in model.mean_curvature_by_kind().items():
                logs[f"curvature_{kind}"] = round(value, 4)
            if "learning_rate" in logs and self.curvature_lr is not None:
                # One schedule scales both groups, so the curvature rate is the logged rate
                # times the ratio of the peaks (the optimizer's own value is already the next
                # step's when the Trainer logs).
                ratio = self.curvature_lr / self.args.learning_rate
                logs["curvature_lr"] = float(logs["learning_rate"]) * ratio
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # Under FSDP and DeepSpeed the Trainer passes the gathered full state dict, because the
        # local parameters may be shards.
        # NOTE: that path is only tested with a single-process state dict: no GPU runs in CI.
        save_adapter(self._adapter_model(), output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = (
                Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            )
            (folder / CHECKPOINT_COMPLETE).write_text(f"{self.state.global_step}\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        adapter_model = self._adapter_model()
        if not (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():
            raise ValueError(
                f"{resume_from_checkpoint} contains no adapter ({CONFIG_NAME} is missing)"
            )
        if isinstance(adapter_model, MoSLoraModel):
            adapter_model._load_weights(resume_from_checkpoint, adapter_model.active_adapter)
        else:
            _load_peft_weights(adapter_model, resume_from_checkpoint)
        logger.info("resumed adapter weights from %s", resume_from_checkpoint)


def save_adapter(model, output_dir: str | Path, state_dict: dict | None = None) -> None:
    """Write a MoSLoRA or PEFT adapter to ``output_dir``, weights first and config last.

    A MoSLoRA model saves atomically on its own. PEFT writes its files in place, so they are
    written to a temporary folder beside the target and renamed into it, the config last: a
    folder with a config always has complete weights.
    """
    output_dir = Path(output_dir)
    if isinstance(model, MoSLoraModel):
        model.save_pretrained(output_dir, state_dict=state_dict)
        return
    staging = output_dir / ".adapter-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), state_dict=state_dict)
    names = sorted(path.name for path in staging.iterdir())
    for name in sorted(names, key=lambda name: name == CONFIG_NAME):
        (staging / name).replace(output_dir / name)
    staging.rmdir()


def _load_peft_weights(model, folder: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint has no adapter weights")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(
            f"{path} has weights this model has no place for ({', '.join(unexpected[:3])}, ...); "
            "resume with the same method and adapter settings"
        )


def training_arguments(config: TrainConfig) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(Path(config.output) / CHECKPOINTS),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="cosine",
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else 0.0,
        bf16=config.dtype == "bfloat16",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        activation_checkpointing=config.gradient_checkpointing,
        # Non-reentrant checkpointing keeps the router's aux loss differentiable: the first
        # forward pass runs with gradients enabled, so the stored aux loss has its graph.
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not torch.cuda.is_available(),
    )


def train(config: TrainConfig, adapter_config: Any = None) -> dict[str, Any]:
    """Fine-tune a base model with the adapter of ``config.method`` and write the run folder.

    ``adapter_config`` is a `MoSLoraConfig` for the MoSLoRA methods or a ``peft.LoraConfig``
    for lora and dora; None builds the method's default (see `methods.adapter_config_for`).
    Returns the run record that is also written to ``<output>/run_config.json``.
    """
    from moslora.data import CausalLMCollator, load_examples, tokenize_for_training
    from moslora.hub import DEFAULT_MODEL, load_model_and_tokenizer

    config.validate()
    if adapter_config is None:
        adapter_config = adapter_config_for(config.method, total_rank=config.total_rank)
    elif config.total_rank is not None and summed_rank(adapter_config) != config.total_rank:
        raise ValueError(
            f"total_rank={config.total_rank} does not match the adapter configuration given, "
            f"whose summed rank is {summed_rank(adapter_config)}; build it with "
            "methods.adapter_config_for(method, total_rank=...) or pass adapter_config=None"
        )
    if method_of(adapter_config) != config.method and not (
        config.method == "moslora" and not is_peft_config(adapter_config)
    ):
        raise ValueError(
            f"--method {config.method} does not match the adapter configuration, which is a "
            f"{method_of(adapter_config)} adapter"
        )
    output = Path(config.output)
    checkpoint = _check_output(output, config, adapter_config)

    examples = load_examples(
        config.data, config.split, data_dir=config.data_dir, limit=config.limit, for_training=True
    )
    transformers.set_seed(config.seed)
    base, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype)
    rows = [tokenize_for_training(example, tokenizer, config.max_length) for example in examples]
    adapter_config.base_model_name_or_path = _model_reference(config.model) or DEFAULT_MODEL
    if config.overwrite and checkpoint is None:
        _remove_previous_run(output)
    output.mkdir(parents=True, exist_ok=True)
    model = attach_adapter(base, adapter_config)
    if not isinstance(model, MoSLoraModel):
        # PEFT replaces the recorded base model with the loaded folder's path; keep the name
        # given, as a MoSLoRA adapter records it.
        peft_config = model.peft_config[model.active_adapter]
        peft_config.base_model_name_or_path = adapter_config.base_model_name_or_path
    model.train()
    trainable, total = model.get_nb_trainable_parameters()

    collator = CausalLMCollator(tokenizer)
    moslora_run = isinstance(model, MoSLoraModel)
    if moslora_run and config.calibrate and not adapter_config.is_euclidean and checkpoint is None:
        batch = collator(rows[: min(len(rows), 16)])
        model.calibrate_input_scale(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )

    trainer = MoSLoraTrainer(
        model=model,
        args=training_arguments(config),
        train_dataset=ListDataset(rows),
        data_collator=collator,
        curvature_lr=config.curvature_lr,
    )
    if moslora_run:
        from moslora.diagnostics import DiagnosticsCallback

        trainer.add_callback(DiagnosticsCallback(model, output, tensorboard=config.tensorboard))
    # Under DDP every process runs this function; only the main one writes and prints.
    main_process = trainer.is_world_process_zero()
    if main_process:
        model.print_trainable_parameters()
    tokens_per_epoch = sum(len(row["input_ids"]) for row in rows)
    record = {
        "moslora_version": moslora.__version__,
        "method": config.method,
        "train": asdict(config),
        "adapter": adapter_settings(adapter_config),
        "examples": len(rows),
        "tokens_per_epoch": tokens_per_epoch,
        "response_tokens": sum(sum(label != -100 for label in row["labels"]) for row in rows),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": _peft_version(),
            "python": platform.python_version(),
        },
        "machine": machine_description(),
    }
    if main_process:
        write_json_atomic(output / RUN_CONFIG_NAME, {**record, "finished": False})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started_step = 0
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if checkpoint is not None:
        started_step = int(Path(checkpoint).name.split("-")[-1])
    record["metrics"] = result.metrics
    record["throughput"] = _throughput(trainer, result.metrics, tokens_per_epoch, started_step)
    record["log_history"] = trainer.state.log_history
    if moslora_run:
        record["curvature"] = model.curvatures()
    record["finished"] = True
    if main_process:
        save_adapter(model, output)
        write_json_atomic(output / RUN_CONFIG_NAME, record)
        logger.info("adapter written to %s", output)
    return record


def _throughput(
    trainer: Trainer, metrics: dict[str, Any], tokens_per_epoch: int, started_step: int
) -> dict[str, Any]:
    """Training tokens per second and peak memory of this process's run.

    Tokens are the non-padding tokens of the examples trained on, counted from the fraction of
    the optimizer steps this process ran (after a resume, only the steps since the checkpoint).
    """
    state = trainer.state
    steps_run = state.global_step - started_step
    fraction = steps_run / state.max_steps if state.max_steps else 0.0
    epochs = trainer.args.num_train_epochs if trainer.args.max_steps <= 0 else state.epoch
    tokens = tokens_per_epoch * float(epochs or 0) * fraction
    runtime = float(metrics.get("train_runtime", 0.0))
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        # ru_maxrss is in KiB on Linux: the peak resident memory of the whole process, model
        # loading included.
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"
    return {
        "train_tokens": round(tokens),
        "wall_seconds": runtime,
        "tokens_per_second": tokens / runtime if runtime > 0 else None,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "steps": steps_run,
    }


def machine_description() -> dict[str, Any]:
    """Describe the platform, CPU count, torch threads and device of this process."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }


def _peft_version() -> str:
    import peft

    return peft.__version__


def _check_output(output: Path, config: TrainConfig, adapter_config: Any) -> str | None:
    """Refuse to mix runs in one folder; return the checkpoint to resume from, if any."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; give a folder for the run")
    if config.resume:
        checkpoint = last_complete_checkpoint(output / CHECKPOINTS)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint found in {output / CHECKPOINTS}; "
                "start without --resume"
            )
        _check_resumed_settings(output, config)
        saved = _comparable(adapter_settings(read_adapter_config(checkpoint)))
        current = _comparable(adapter_settings(adapter_config))
        differing = sorted(
            key for key in set(current) | set(saved) if saved.get(key) != current.get(key)
        )
        if differing:
            details = ", ".join(
                f"{key}={saved.get(key)!r} (now {current.get(key)!r})" for key in differing
            )
            raise ValueError(
                f"--resume: the checkpoint {checkpoint} was made with {details}; "
                "resume with the same method and adapter settings"
            )
        return checkpoint
    if config.overwrite:
        return None
    if (output / CONFIG_NAME).is_file():
        raise FileExistsError(
            f"{output} already contains a trained adapter; pass --overwrite to replace it, "
            "--resume to continue its run, or choose another --output"
        )
    if last_complete_checkpoint(output / CHECKPOINTS) is not None:
        raise FileExistsError(
            f"{output} contains checkpoints of an unfinished run; pass --resume to continue it, "
            "--overwrite to start again, or choose another --output"
        )
    return None


# Training settings a resumed run must share with the run it continues. The Trainer restores the
# optimizer, scheduler and data order from the checkpoint, so a changed value would be recorded
# but not used.
RESUME_FIXED_SETTINGS = (
    "method", "data", "split", "limit", "max_length", "epochs", "max_steps", "batch_size",
    "gradient_accumulation", "lr", "curvature_lr", "weight_decay", "warmup_ratio",
    "max_grad_norm", "dtype", "seed", "total_rank", "calibrate", "gradient_checkpointing",
)  # fmt: skip


def _check_resumed_settings(output: Path, config: TrainConfig) -> None:
    record = read_run_config(output)
    if record is None or not isinstance(record.get("train"), dict):
        return
    saved, current = record["train"], asdict(config)
    differing = [
        name for name in RESUME_FIXED_SETTINGS if name in saved and saved[name] != current[name]
    ]
    if differing:
        details = ", ".join(
            f"--{name.replace('_', '-')} {saved[name]!r} (now {current[name]!r})"
            for name in differing
        )
        raise ValueError(
            f"--resume: the run in {output} was started with {details}; resume with the same "
            "settings, or start a new run with --overwrite or another --output"
        )


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """Adapter settings with the target-module list sorted, because its order has no effect."""
    targets = settings.get("target_modules")
    if isinstance(targets, list):
        settings = {**settings, "target_modules": sorted(targets)}
    return settings


def _remove_previous_run(output: Path) -> None:
    """Delete the files of an earlier run, so a killed new run never looks finished."""
    # The config goes first: a folder without it is not a loadable adapter.
    for name in (CONFIG_NAME, WEIGHTS_NAME, RUN_CONFIG_NAME, DIAGNOSTICS_NAME):
        (output / name).unlink(missing_ok=True)
    for folder in (CHECKPOINTS, TENSORBOARD_DIR, FIGURES_DIR):
        shutil.rmtree(output / folder, ignore_errors=True)


def _model_reference(model: str | None) -> str | None:
    """``--model`` as recorded in the adapter: local folders as absolute paths."""
    if model is not None and Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    return model


def last_complete_checkpoint(folder: Path) -> str | None:
    """Return the checkpoint of the highest step whose saving finished, or None."""
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        name = path.name
        if (
            path.is_dir()
            and name.startswith("checkpoint-")
            and name[len("checkpoint-") :].isdigit()
        ):
            steps.append((int(name[len("checkpoint-") :]), path))
    for _, path in sorted(steps, reverse=True):
        if (path / CHECKPOINT_COMPLETE).is_file():
            return str(path)
        logger.warning("ignoring %s: its saving did not finish", path)
    return None


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())
