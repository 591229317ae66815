"""Fine-tuning with the Hugging Face Trainer: the router's auxiliary loss, a separate
learning rate for curvatures, adapter-only checkpoints and resumption."""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import moslora
from moslora.config import CONFIG_NAME, WEIGHTS_NAME, MoSLoraConfig, field_help
from moslora.files import write_json_atomic
from moslora.model import MoSLoraModel, get_moslora_model

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
CHECKPOINTS = "checkpoints"
# Written into a checkpoint folder after everything else in it. The Trainer writes checkpoint
# files one by one, so a folder without this marker may be missing its optimizer state.
CHECKPOINT_COMPLETE = "moslora-checkpoint-complete"


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run (every field is also a `moslora train` flag)."""

    output: str | None = field(
        default=None, metadata=field_help("Run folder: adapter, run configuration, checkpoints.")
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
    progress: bool = field(default=True, metadata=field_help("Show a progress bar."))

    def validate(self) -> None:
        if not self.output:
            raise ValueError("--output is required: the folder the run writes its adapter to")
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
    """A Trainer that adds the router's load-balancing loss and saves only the adapter."""

    def __init__(self, *args: Any, curvature_lr: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.curvature_lr = curvature_lr
        self._aux_total = 0.0
        self._aux_count = 0

    def _adapter_model(self) -> MoSLoraModel:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, MoSLoraModel):
            raise TypeError(f"MoSLoraTrainer trains a MoSLoraModel, got {type(model).__name__}")
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        adapter_model = self._adapter_model()
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
        if "loss" in logs:
            model = self._adapter_model()
            if self._aux_count:
                logs["aux_loss"] = round(self._aux_total / self._aux_count, 4)
                self._aux_total, self._aux_count = 0.0, 0
            for kind, value in model.mean_curvature_by_kind().items():
                logs[f"curvature_{kind}"] = round(value, 4)
            if self.optimizer is not None and len(self.optimizer.param_groups) > 1:
                logs["curvature_lr"] = self.optimizer.param_groups[-1]["lr"]
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # Under FSDP and DeepSpeed the Trainer passes the gathered full state dict, because the
        # local parameters may be shards.
        # NOTE: that path is only tested with a single-process state dict: no GPU runs in CI.
        self._adapter_model().save_pretrained(output_dir, state_dict=state_dict)

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
        adapter_model._load_weights(resume_from_checkpoint, adapter_model.active_adapter)
        logger.info("resumed adapter weights from %s", resume_from_checkpoint)


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


def train(config: TrainConfig, adapter_config: MoSLoraConfig) -> dict[str, Any]:
    """Fine-tune a base model with a MoSLoRA adapter and write the run folder.

    Returns the run record that is also written to ``<output>/run_config.json``.
    """
    from moslora.data import CausalLMCollator, load_examples, tokenize_for_training
    from moslora.hub import DEFAULT_MODEL, load_model_and_tokenizer

    config.validate()
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
    model = get_moslora_model(base, adapter_config)
    model.train()
    trainable, total = model.get_nb_trainable_parameters()

    collator = CausalLMCollator(tokenizer)
    if config.calibrate and not adapter_config.is_euclidean and checkpoint is None:
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
    # Under DDP every process runs this function; only the main one writes and prints.
    main_process = trainer.is_world_process_zero()
    if main_process:
        model.print_trainable_parameters()
    record = {
        "moslora_version": moslora.__version__,
        "train": asdict(config),
        "adapter": adapter_config.to_dict(),
        "examples": len(rows),
        "response_tokens": sum(sum(label != -100 for label in row["labels"]) for row in rows),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    if main_process:
        write_json_atomic(output / RUN_CONFIG_NAME, {**record, "finished": False})
    result = trainer.train(resume_from_checkpoint=checkpoint)
    record["metrics"] = result.metrics
    record["log_history"] = trainer.state.log_history
    record["curvature"] = model.curvatures()
    record["finished"] = True
    if main_process:
        model.save_pretrained(output)
        write_json_atomic(output / RUN_CONFIG_NAME, record)
        logger.info("adapter written to %s", output)
    return record


def _check_output(output: Path, config: TrainConfig, adapter_config: MoSLoraConfig) -> str | None:
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
        saved = MoSLoraConfig.load(checkpoint).to_dict()
        current = adapter_config.to_dict()
        differing = sorted(
            key
            for key in current
            if key != "base_model_name_or_path" and saved.get(key) != current[key]
        )
        if differing:
            details = ", ".join(
                f"{key}={saved.get(key)!r} (now {current[key]!r})" for key in differing
            )
            raise ValueError(
                f"--resume: the checkpoint {checkpoint} was made with {details}; "
                "resume with the same adapter settings"
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


def _remove_previous_run(output: Path) -> None:
    """Delete the files of an earlier run, so a killed new run never looks finished."""
    # The config goes first: a folder without it is not a loadable adapter.
    for name in (CONFIG_NAME, WEIGHTS_NAME, RUN_CONFIG_NAME):
        (output / name).unlink(missing_ok=True)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)


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
