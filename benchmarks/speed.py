"""Speed and memory of MoSLoRA against PEFT's LoRA and the frozen base model.

Every comparison runs in one process on the same model, batch and sequence length, with the
variants interleaved (A B C A B C ...). The script reports medians and the median of per-round
ratios, which cancels most of the drift of a shared machine.

    python benchmarks/speed.py --model small            # a 4-layer Llama built from a config
    python benchmarks/speed.py --model smollm2 --rounds 5
    python benchmarks/speed.py --model small --profile  # where a moslora step spends its time

Targets (checked here, never in unit tests): a moslora training step at equal total rank within
1.15x of PEFT LoRA's, generation within 1.2x of PEFT LoRA's (unmerged), the fast transition at
least 2x faster than the exact one on the adapter layer alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moslora import MoSLoraConfig, MoSLoraLinear, get_moslora_model

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
TRAIN_STEP_TARGET = 1.15
GENERATION_TARGET = 1.2
FAST_TRANSITION_TARGET = 2.0


def build_base(name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if name == "small":
        config = LlamaConfig(
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        return AutoModelForCausalLM.from_config(config)
    if name == "smollm2":
        from moslora.hub import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(None)
        return model
    raise ValueError(f"--model must be small or smollm2, got {name!r}")


def _randomise(model: nn.Module) -> None:
    # Non-zero B and router weights, so the curved gains are not at their B = 0 values.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "moslora_B" in name or "lora_B" in name:
                parameter.normal_(std=0.02)


def build_variant(name: str, model_name: str, rank: int) -> nn.Module:
    """Build one model per variant: base, lora, moslora-third or moslora-full, with an optional
    suffix :fast, :shared or :compile on the moslora ones."""
    base = build_base(model_name)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    if name == "base":
        base.enable_input_require_grads()
        return base
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.05)
        model = get_peft_model(base, config)
        _randomise(model)
        return model
    expert_rank = {"moslora-third": rank // 3, "moslora-full": rank}
    settings = {
        "fast": {"transition": "fast"},
        "shared": {"share_router": True},
        "compile": {"compile": True},
    }
    family, _, option = name.partition(":")
    if family not in expert_rank:
        raise ValueError(f"unknown variant {name!r}")
    extra = settings[option] if option else {}
    config = MoSLoraConfig(
        experts=["euclidean", "hyperbolic", "spherical"],
        r=expert_rank[family],
        lora_alpha=2 * expert_rank[family],
        target_modules=TARGETS,
        **extra,
    )
    model = get_moslora_model(base, config)
    _randomise(model)
    return model


def _batch(model: nn.Module, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _train_step(model, batch, optimizer) -> float:
    started = time.perf_counter()
    output = model(**batch)
    loss = output.loss
    aux = getattr(model, "router_aux_loss", None)
    if callable(aux) and aux() is not None:
        loss = loss + 0.01 * aux()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def _generate(model, batch, new_tokens: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - started


def _interleave(
    run_by_variant: dict[str, Any], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in run_by_variant}
    for round_index in range(warmup + rounds):
        for name, run in run_by_variant.items():
            elapsed = run()
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def _summary(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    rows = {}
    for name, values in times.items():
        ratios = [value / ref for value, ref in zip(values, times[reference], strict=True)]
        rows[name] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "ratio_to_" + reference: statistics.median(ratios),
        }
    return rows


def bench_training(args) -> dict[str, Any]:
    variants = [
        "base",
        "lora",
        "moslora-third",
        "moslora-third:fast",
        "moslora-third:shared",
        "moslora-third:compile",
        "moslora-full",
    ]
    models, optimizers, runs = {}, {}, {}
    for name in variants:
        model = build_variant(name, args.model, args.rank)
        model.train()
        models[name] = model
        parameters = [p for p in _trainable(model) if name != "base"]
        optimizers[name] = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None
    batch = _batch(models["base"], args.batch_size, args.length)
    for name in variants:
        runs[name] = lambda n=name: _train_step(models[n], batch, optimizers[n])
    times = _interleave(runs, args.rounds)
    result = _summary(times, "lora")
    for name in variants:
        result[name]["trainable_parameters"] = sum(p.numel() for p in _trainable(models[name]))
        result[name]["ratio_to_base"] = statistics.median(
            [value / ref for value, ref in zip(times[name], times["base"], strict=True)]
        )
    return result


def bench_generation(args) -> dict[str, Any]:
    variants = ["base", "lora", "moslora-third", "moslora-third:shared", "moslora-third:compile"]
    models = {name: build_variant(name, args.model, args.rank).eval() for name in variants}
    batch = _batch(models["base"], args.generate_batch, args.generate_prompt)
    runs = {
        name: (lambda n=name: _generate(models[n], batch, args.new_tokens)) for name in variants
    }
    times = _interleave(runs, args.rounds)
    result = _summary(times, "lora")
    tokens = args.generate_batch * args.new_tokens
    for name in variants:
        result[name]["tokens_per_s"] = tokens / result[name]["median_s"]
    return result


def bench_transition(args) -> dict[str, Any]:
    torch.manual_seed(0)
    hidden = 576 if args.model == "smollm2" else 256
    layers = {}
    for mode in ("exact", "fast"):
        layer = MoSLoraLinear(nn.Linear(hidden, hidden))
        layer.base_layer.requires_grad_(False)
        config = MoSLoraConfig(
            experts=["euclidean", "hyperbolic", "spherical"], r=8, transition=mode, lora_dropout=0.0
        )
        layer.add_adapter("default", config)
        with torch.no_grad():
            layer.moslora_B["default"].normal_(std=0.02)
        layers[mode] = layer
    x = torch.randn(args.batch_size * args.length, hidden)

    def step(layer):
        def run():
            started = time.perf_counter()
            # The geometric part alone: the radial gains and their backward pass.
            h = (x @ layer.moslora_A["default"].t()).view(x.shape[0], 3, 8)
            gains = layer._gains(x, h, layer.moslora_B["default"], "default")
            gains.sum().backward()
            return time.perf_counter() - started

        return run

    def full(layer):
        def run():
            started = time.perf_counter()
            layer(x).sum().backward()
            return time.perf_counter() - started

        return run

    rounds = args.rounds * 4
    gains = _summary(_interleave({mode: step(ly) for mode, ly in layers.items()}, rounds), "exact")
    whole = _summary(_interleave({mode: full(ly) for mode, ly in layers.items()}, rounds), "exact")
    return {"gains_only": gains, "whole_layer": whole, "tokens": x.shape[0], "hidden": hidden}


def _saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for the backward pass."""
    parameters = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.data_ptr() not in parameters and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    return total


def bench_memory(args) -> dict[str, Any]:
    """Training memory that differs between variants: saved activations and adapter state.

    A process's peak resident memory on CPU includes the model load and only grows, so it
    cannot separate variants. The activations saved for backward are counted exactly instead,
    and the trainable parameters with their gradient and two AdamW moments (4 copies).
    On a GPU the peak allocated memory of one step is reported too.
    """
    result = {}
    for name in ["base", "lora", "moslora-third", "moslora-third:shared", "moslora-full"]:
        model = build_variant(name, args.model, args.rank)
        model.train()
        batch = _batch(model, args.batch_size, args.length)
        row = {"saved_activations_mb": _saved_bytes(model, batch) / 2**20}
        trainable = sum(p.numel() * p.element_size() for p in _trainable(model))
        row["adapter_state_mb"] = 4 * trainable / 2**20 if name != "base" else 0.0
        if torch.cuda.is_available():
            model.cuda()
            batch = {key: value.cuda() for key, value in batch.items()}
            torch.cuda.reset_peak_memory_stats()
            _train_step(model, batch, None)
            row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result[name] = row
        del model
    return result


def profile_step(args) -> str:
    from torch.profiler import ProfilerActivity, profile

    model = build_variant("moslora-third", args.model, args.rank)
    model.train()
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-4)
    batch = _batch(model, args.batch_size, args.length)
    _train_step(model, batch, optimizer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train_step(model, batch, optimizer)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def _machine() -> str:
    cores = os.cpu_count()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {cores} cores"
    threads = torch.get_num_threads()
    return f"{device}; {platform.machine()}; torch {torch.__version__}; {threads} threads"


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "| training step | median s | vs PEFT LoRA | vs base | trainable params |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["training"].items():
        lines.append(
            f"| {name} | {row['median_s']:.3f} | {row['ratio_to_lora']:.2f}x | "
            f"{row['ratio_to_base']:.2f}x | {row['trainable_parameters']:,d} |"
        )
    lines += ["", "| generation | median s | tokens/s | vs PEFT LoRA |", "|---|---|---|---|"]
    for name, row in result["generation"].items():
        lines.append(
            f"| {name} | {row['median_s']:.3f} | {row['tokens_per_s']:.1f} | "
            f"{row['ratio_to_lora']:.2f}x |"
        )
    lines += [
        "",
        "| transition | gains only, median ms | vs exact | whole layer, median ms | vs exact |",
        "|---|---|---|---|---|",
    ]
    for mode in ("exact", "fast"):
        gains, whole = (
            result["transition"]["gains_only"][mode],
            result["transition"]["whole_layer"][mode],
        )
        lines.append(
            f"| {mode} | {1e3 * gains['median_s']:.2f} | {gains['ratio_to_exact']:.2f}x | "
            f"{1e3 * whole['median_s']:.2f} | {whole['ratio_to_exact']:.2f}x |"
        )
    if "memory" in result:
        lines += [
            "",
            "| training memory | saved activations MB | adapter state MB (x4) |",
            "|---|---|---|",
        ]
        for name, row in result["memory"].items():
            saved, state = row["saved_activations_mb"], row["adapter_state_mb"]
            lines.append(f"| {name} | {saved:.1f} | {state:.1f} |")
    lines.append("")
    lines.append(_verdict(result))
    return "\n".join(lines)


def _verdict(result: dict[str, Any]) -> str:
    train_ratio = result["training"]["moslora-third"]["ratio_to_lora"]
    generation_ratio = result["generation"]["moslora-third"]["ratio_to_lora"]
    fast_speedup = 1 / result["transition"]["gains_only"]["fast"]["ratio_to_exact"]
    checks = [
        (
            f"training step, 3 experts of rank r/3 vs LoRA rank r: {train_ratio:.2f}x",
            train_ratio <= TRAIN_STEP_TARGET,
            f"<= {TRAIN_STEP_TARGET}x",
        ),
        (
            f"generation vs LoRA (unmerged): {generation_ratio:.2f}x",
            generation_ratio <= GENERATION_TARGET,
            f"<= {GENERATION_TARGET}x",
        ),
        (
            f"fast transition speed-up on the gains: {fast_speedup:.2f}x",
            fast_speedup >= FAST_TRANSITION_TARGET,
            f">= {FAST_TRANSITION_TARGET}x",
        ),
    ]
    return "\n".join(
        f"- {text} (target {target}): {'met' if ok else 'MISSED'}" for text, ok, target in checks
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="small (a 4-layer Llama) or smollm2.")
    parser.add_argument(
        "--rank", type=int, default=24, help="LoRA rank r; moslora uses 3 experts of r/3 and of r."
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Training batch size.")
    parser.add_argument(
        "--length", type=int, default=128, help="Training sequence length in tokens."
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="Timed rounds per variant, after one warm-up."
    )
    parser.add_argument("--generate-batch", type=int, default=8, help="Prompts generated together.")
    parser.add_argument("--generate-prompt", type=int, default=64, help="Prompt length in tokens.")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens generated per prompt.")
    parser.add_argument(
        "--no-memory", action="store_true", help="Skip the peak-memory subprocesses."
    )
    parser.add_argument(
        "--profile", action="store_true", help="Print a profile of one moslora step."
    )
    parser.add_argument("--output", help="Write the results as JSON to this file.")
    args = parser.parse_args()
    if args.profile:
        print(profile_step(args))
        return
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]),
        "machine": _machine(),
        "date": datetime.date.today().isoformat(),
        "settings": vars(args),
    }
    result["training"] = bench_training(args)
    result["generation"] = bench_generation(args)
    result["transition"] = bench_transition(args)
    if not args.no_memory:
        result["memory"] = bench_memory(args)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    markdown = _markdown(result)
    print(f"{result['command']}\n{result['machine']}, {result['date']}\n")
    print(markdown)
    if args.output:
        Path(args.output).write_text(json.dumps({**result, "markdown": markdown}, indent=2) + "\n")


if __name__ == "__main__":
    main()
