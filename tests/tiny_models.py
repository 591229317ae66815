"""Tiny causal language models built from configs (no downloads), shared by the tests."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 256


def tiny_config(architecture: str = "llama"):
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    if architecture == "llama":
        return LlamaConfig(**common)
    if architecture == "qwen2":
        return Qwen2Config(**common)
    if architecture == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown tiny architecture {architecture!r}")


def tiny_model(architecture: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(architecture)).eval()


def randomise_adapter(model, std: float = 0.2, seed: int = 1) -> None:
    """Give every B matrix and router non-zero values, so comparisons mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "moslora_B" in name or "moslora_router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
