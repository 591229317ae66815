"""The adapter configuration: what to adapt, with which experts, and how to route between them."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moslora.files import write_json_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

EXPERT_KINDS = ("euclidean", "hyperbolic", "spherical", "free", "lorentz")
ROUTERS = ("dense", "topk")
TRANSITIONS = ("exact", "fast")

# The sign a kind's curvature is held to: -1, 0 or +1, or None when it may change sign.
KIND_SIGN = {"euclidean": 0, "hyperbolic": -1, "spherical": 1, "free": None, "lorentz": -1}
DEFAULT_INIT_CURVATURE = {"hyperbolic": -0.5, "spherical": 0.5, "free": 0.0, "lorentz": -0.5}

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
DEFAULT_ROUTER_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def field_help(text: str) -> dict[str, str]:
    """Dataclass field metadata carrying the help text that the CLI shows for the flag."""
    return {"help": text}


@dataclass
class MoSLoraConfig:
    """Configuration of a Mixture-of-Space LoRA adapter.

    Each adapted linear layer computes ``W x + (alpha / r) * sum_e g_e(x) * Delta_e(x)``, where
    ``Delta_e`` is a rank-``r`` expert living in a space of constant curvature and ``g(x)`` are
    the router weights.
    """

    target_modules: list[str] | str = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata=field_help(
            "Modules to adapt: a list of names, each matching the last part(s) of a module path "
            "('q_proj' matches 'model.layers.0.self_attn.q_proj'), or one regular expression "
            "matched against the whole path. Only torch.nn.Linear modules can be adapted."
        ),
    )
    experts: list[str] = field(
        default_factory=lambda: ["euclidean", "hyperbolic", "spherical"],
        metadata=field_help(
            "Kind of each expert, repeated for several of a kind: "
            f"any of {', '.join(EXPERT_KINDS)}. 'free' has a learnable curvature of either sign. "
            "'lorentz' is hyperbolic in the Lorentz model: its low-rank map acts on the "
            "hyperboloid's space coordinates instead of the Poincare ball."
        ),
    )
    r: int = field(default=8, metadata=field_help("Rank of each expert."))
    lora_alpha: float = field(
        default=16.0,
        metadata=field_help("Scaling numerator: updates are scaled by lora_alpha / r."),
    )
    lora_dropout: float = field(
        default=0.05, metadata=field_help("Dropout probability on the adapter's input, in [0, 1).")
    )
    init_curvature: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_INIT_CURVATURE),
        metadata=field_help(
            "Initial curvature per expert kind. Hyperbolic and Lorentz values must be negative, "
            "spherical positive, and every magnitude below max_curvature."
        ),
    )
    max_curvature: float = field(
        default=2.0,
        metadata=field_help(
            "Bound on the magnitude of every learned curvature: |k| <= max_curvature."
        ),
    )
    learn_curvature: bool = field(
        default=True,
        metadata=field_help("Train the curvatures (otherwise they stay at their init)."),
    )
    learn_input_scale: bool = field(
        default=True,
        metadata=field_help(
            "Train the input scale s, which divides the input before it enters a curved space."
        ),
    )
    input_scale: float | None = field(
        default=None,
        metadata=field_help(
            "Initial input scale s. None uses sqrt(in_features); `calibrate_input_scale` sets it "
            "to the median input norm seen on real data."
        ),
    )
    router: str = field(
        default="dense",
        metadata=field_help("'dense' mixes all experts with softmax weights; 'topk' keeps top_k."),
    )
    top_k: int = field(
        default=1, metadata=field_help("Experts kept per token when router is 'topk'.")
    )
    share_router: bool = field(
        default=False,
        metadata=field_help(
            "Let the adapted modules of one router group (modules with the same parent that read "
            "the same input) share one router and evaluate it once per forward pass."
        ),
    )
    router_groups: list[list[str]] = field(
        default_factory=lambda: [list(group) for group in DEFAULT_ROUTER_GROUPS],
        metadata=field_help(
            "Module names that read the same input, per group, used by share_router. The "
            "default fits Llama-style blocks: q_proj, k_proj, v_proj and gate_proj, up_proj."
        ),
    )
    router_aux_loss_coef: float = field(
        default=0.01,
        metadata=field_help(
            "Coefficient of the load-balancing loss E * sum_e f_e * P_e added to the training loss."
        ),
    )
    transition: str = field(
        default="exact",
        metadata=field_help(
            "How inputs move into and out of the curved spaces: 'exact' uses tan/artan maps, "
            "'fast' the rational stereographic maps (no transcendental functions)."
        ),
    )
    compile: bool = field(
        default=False,
        metadata=field_help(
            "Compile the per-token gain computation with torch.compile, fusing its elementwise "
            "operations into one kernel. The first forward pass compiles; CPUs need a C++ compiler."
        ),
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata=field_help("Base model the adapter was made for (recorded, not used)."),
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.experts = list(self.experts)
        if isinstance(self.router_groups, (list, tuple)):
            self.router_groups = [
                list(group) if isinstance(group, (list, tuple)) else group
                for group in self.router_groups
            ]
        self.init_curvature = {**DEFAULT_INIT_CURVATURE, **dict(self.init_curvature)}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and the values it accepts."""
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError(
                    "target_modules: an empty pattern matches nothing; give names or a regex"
                )
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(
                    f"target_modules: {self.target_modules!r} is not a valid regular expression "
                    f"({error}); give module names separated by commas or fix the pattern"
                ) from error
        elif not self.target_modules or not all(
            isinstance(n, str) and n for n in self.target_modules
        ):
            raise ValueError(
                "target_modules must be a non-empty list of module names or one regex, "
                f"got {self.target_modules!r}"
            )
        if not self.experts:
            raise ValueError(f"experts must list at least one of {', '.join(EXPERT_KINDS)}")
        for kind in self.experts:
            if kind not in EXPERT_KINDS:
                raise ValueError(
                    f"experts: unknown expert kind {kind!r}; allowed: {', '.join(EXPERT_KINDS)}"
                )
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not _finite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not _finite(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not _finite(self.max_curvature) or self.max_curvature <= 0:
            raise ValueError(f"max_curvature must be a positive number, got {self.max_curvature!r}")
        for kind, value in self.init_curvature.items():
            self._validate_curvature(kind, value)
        if self.input_scale is not None and (
            not _finite(self.input_scale) or self.input_scale <= 0
        ):
            raise ValueError(
                f"input_scale must be a positive number or None, got {self.input_scale!r}"
            )
        if self.router not in ROUTERS:
            raise ValueError(
                f"router: unknown router {self.router!r}; allowed: {', '.join(ROUTERS)}"
            )
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(self.experts):
            raise ValueError(
                f"top_k must be an integer from 1 to the number of experts ({len(self.experts)}), "
                f"got {self.top_k!r}"
            )
        if not _finite(self.router_aux_loss_coef) or self.router_aux_loss_coef < 0:
            raise ValueError(
                "router_aux_loss_coef must be a non-negative number, "
                f"got {self.router_aux_loss_coef!r}"
            )
        groups = self.router_groups
        if not isinstance(groups, list) or not all(
            isinstance(group, list) and all(isinstance(name, str) and name for name in group)
            for group in groups
        ):
            raise ValueError(
                f"router_groups must be a list of lists of module names, got {groups!r}"
            )
        if self.transition not in TRANSITIONS:
            raise ValueError(
                f"transition: unknown mode {self.transition!r}; allowed: {', '.join(TRANSITIONS)}"
            )

    def _validate_curvature(self, kind: str, value: float) -> None:
        if kind not in KIND_SIGN or kind == "euclidean":
            allowed = ", ".join(k for k in EXPERT_KINDS if k != "euclidean")
            raise ValueError(
                f"init_curvature: unknown kind {kind!r}; allowed: {allowed} "
                "(euclidean experts have curvature 0)"
            )
        if not _finite(value):
            raise ValueError(f"init_curvature[{kind!r}] must be a finite number, got {value!r}")
        sign = KIND_SIGN[kind]
        if sign == -1 and not value < 0:
            raise ValueError(f"init_curvature[{kind!r}] must be negative, got {value!r}")
        if sign == 1 and not value > 0:
            raise ValueError(f"init_curvature[{kind!r}] must be positive, got {value!r}")
        if abs(value) >= self.max_curvature:
            raise ValueError(
                f"init_curvature[{kind!r}] = {value!r} is outside the bound |k| < "
                f"max_curvature = {self.max_curvature!r}; lower it or raise max_curvature"
            )

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def is_euclidean(self) -> bool:
        """True when every expert is Euclidean, so the update is linear in the input."""
        return all(kind == "euclidean" for kind in self.experts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_type"] = "moslora"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> MoSLoraConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"adapter_type", "moslora_version"})
        if unknown:
            raise ValueError(
                f"{source}: unknown field(s) {', '.join(unknown)}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        return cls(**{key: value for key, value in data.items() if key in known})

    def save(self, directory: str | Path) -> Path:
        from moslora import __version__

        path = Path(directory) / CONFIG_NAME
        write_json_atomic(path, {**self.to_dict(), "moslora_version": __version__})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MoSLoraConfig:
        path = Path(directory) / CONFIG_NAME
        data = read_adapter_json(directory)
        if not isinstance(data, dict) or data.get("adapter_type") != "moslora":
            raise ValueError(
                f'{path} is not a moslora adapter config (no "adapter_type": "moslora")'
            )
        try:
            return cls.from_dict(data, source=str(path))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error


def read_adapter_json(directory: str | Path) -> Any:
    """Parse the ``adapter_config.json`` of an adapter folder, MoSLoRA or PEFT."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an adapter folder contains {CONFIG_NAME} and {WEIGHTS_NAME}, "
            "as written by `moslora train` or save_pretrained"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); the adapter folder is damaged"
        ) from error


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
