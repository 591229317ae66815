"""The fine-tuning methods `moslora train --method` selects, in one code path.

MoSLoRA and its single-space ablations are `MoSLoraConfig` adapters that differ only in their
experts. ``hyplora`` is one hyperbolic expert in the Lorentz model, whose low-rank map acts on
the hyperboloid's space coordinates (after Yang et al., "Hyperbolic Fine-tuning for Large
Language Models"). ``lora`` and ``dora`` are PEFT's own implementations, built from the same
rank, alpha, dropout and target modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moslora.config import WEIGHTS_NAME, MoSLoraConfig, read_adapter_json

# The experts of each MoSLoRA-family method.
MOSLORA_METHODS: dict[str, list[str]] = {
    "moslora": ["euclidean", "hyperbolic", "spherical"],
    "euclidean": ["euclidean"],
    "hyperbolic": ["hyperbolic"],
    "spherical": ["spherical"],
    "hyplora": ["lorentz"],
}
PEFT_METHODS = ("lora", "dora")
METHODS = (*MOSLORA_METHODS, *PEFT_METHODS)

# The settings a PEFT LoRA or DoRA adapter shares with a MoSLoRA one.
PEFT_SHARED_SETTINGS = ("target_modules", "r", "lora_alpha", "lora_dropout")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")


def adapter_config_for(
    method: str, settings: dict[str, Any] | None = None, *, total_rank: int | None = None
) -> Any:
    """Build the adapter configuration of ``method`` from the adapter settings that were given.

    ``settings`` holds only settings set explicitly (by a flag or a recipe), as
    `MoSLoraConfig` field names; the rest keep their defaults. ``total_rank`` matches
    parameter budgets across methods: it sets the summed rank of all experts of a module (the
    rank itself for LoRA and DoRA) and changes ``lora_alpha`` by the same factor as ``r``, so
    the scaling ``lora_alpha / r`` stays the same. Returns a `MoSLoraConfig` or a
    ``peft.LoraConfig``.
    """
    check_method(method)
    values = dict(settings or {})
    if method in PEFT_METHODS:
        # A MoSLoRA-only setting at its default value changes nothing, so it is accepted.
        default = MoSLoraConfig()
        extra = sorted(
            name
            for name in set(values) - set(PEFT_SHARED_SETTINGS) - {"base_model_name_or_path"}
            if values[name] != getattr(default, name, None)
        )
        if extra:
            flags = ", ".join("--" + name.replace("_", "-") for name in extra)
            verb = "applies" if len(extra) == 1 else "apply"
            raise ValueError(
                f"{flags} {verb} only to MoSLoRA adapters, not to --method {method}; remove "
                f"{'it' if len(extra) == 1 else 'them'} (a {method} adapter takes "
                f"{', '.join(PEFT_SHARED_SETTINGS)})"
            )
    else:
        experts = MOSLORA_METHODS[method]
        given = values.get("experts")
        if given is not None and method != "moslora" and list(given) != experts:
            raise ValueError(
                f"--experts {','.join(given)} contradicts --method {method}, which uses "
                f"experts {','.join(experts)}; use --method moslora for another mixture"
            )
        values.setdefault("experts", experts)
    defaults = MoSLoraConfig(**{key: values[key] for key in values if key != "experts"})
    if total_rank is not None:
        _apply_total_rank(values, defaults, method, total_rank)
    if method in PEFT_METHODS:
        return _peft_config(method, {**_shared_defaults(defaults), **values})
    return MoSLoraConfig(**values)


def _apply_total_rank(
    values: dict[str, Any], defaults: MoSLoraConfig, method: str, total_rank: int
) -> None:
    if not isinstance(total_rank, int) or isinstance(total_rank, bool) or total_rank < 1:
        raise ValueError(f"--total-rank must be a positive integer, got {total_rank!r}")
    experts = 1 if method in PEFT_METHODS else len(values["experts"])
    if total_rank % experts:
        raise ValueError(
            f"--total-rank {total_rank} cannot be split evenly over {experts} experts; "
            f"give a multiple of {experts}"
        )
    rank = total_rank // experts
    values["lora_alpha"] = defaults.lora_alpha * rank / defaults.r
    values["r"] = rank


def _shared_defaults(config: MoSLoraConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in PEFT_SHARED_SETTINGS}


def _peft_config(method: str, values: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=values["r"],
        lora_alpha=values["lora_alpha"],
        lora_dropout=values["lora_dropout"],
        target_modules=values["target_modules"],
        use_dora=method == "dora",
        base_model_name_or_path=values.get("base_model_name_or_path"),
    )


def summed_rank(config: Any) -> int:
    """Return the summed rank of all experts of one adapted module."""
    return config.r if is_peft_config(config) else config.r * config.num_experts


def is_peft_config(config: Any) -> bool:
    return not isinstance(config, MoSLoraConfig)


def method_of(config: Any) -> str:
    """Name the method an adapter configuration belongs to."""
    if is_peft_config(config):
        return "dora" if config.use_dora else "lora"
    for method, experts in MOSLORA_METHODS.items():
        if config.experts == experts:
            return method
    return "moslora"


def adapter_settings(config: Any) -> dict[str, Any]:
    """Return the settings that define an adapter, as JSON values, for records and comparisons."""
    if not is_peft_config(config):
        settings = config.to_dict()
        settings.pop("base_model_name_or_path", None)
        return settings
    targets = config.target_modules
    return {
        "adapter_type": "dora" if config.use_dora else "lora",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
    }


def read_adapter_config(folder: str | Path) -> Any:
    """Read the adapter configuration in ``folder``: a `MoSLoraConfig` or a PEFT config."""
    data = read_adapter_json(folder)
    if isinstance(data, dict) and "peft_type" in data:
        from peft import PeftConfig

        return PeftConfig.from_pretrained(str(folder))
    return MoSLoraConfig.load(folder)


def attach_adapter(base: nn.Module, config: Any) -> nn.Module:
    """Wrap ``base`` with a new, trainable adapter of ``config``."""
    if is_peft_config(config):
        from peft import get_peft_model

        return get_peft_model(base, config)
    from moslora.model import get_moslora_model

    return get_moslora_model(base, config)


def load_trained_adapter(base: nn.Module, folder: str | Path) -> nn.Module:
    """Wrap ``base`` with the adapter saved in ``folder``, for inference."""
    config = read_adapter_config(folder)
    if is_peft_config(config):
        return _load_peft_adapter(base, Path(folder))
    from moslora.model import MoSLoraModel

    return MoSLoraModel.from_pretrained(base, folder)


def _load_peft_adapter(base: nn.Module, folder: Path) -> nn.Module:
    """Load a PEFT adapter and check that every saved tensor found its module in ``base``."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    hint = "pass --model with the base model the adapter was trained on"
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        message = f"{folder}: the adapter does not fit this model ({reason}); {hint}"
        raise ValueError(message) from None
    saved = set(load_file(str(folder / WEIGHTS_NAME)))
    unplaced = sorted(saved - set(get_peft_model_state_dict(model)))
    if unplaced:
        raise ValueError(
            f"{folder}: {len(unplaced)} adapter tensor(s) have no module in this model "
            f"(first: {unplaced[0]}); {hint}"
        )
    return model
