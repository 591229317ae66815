"""Injection of MoSLoRA adapters into a transformers model, with a PEFT-like surface.

``get_moslora_model(model, config)`` replaces every targeted ``nn.Linear`` with a
``MoSLoraLinear`` holding the adapter, freezes the base model and returns a ``MoSLoraModel``
wrapper offering ``print_trainable_parameters``, ``save_pretrained``, ``from_pretrained``,
named adapters, ``merge_and_unload`` and access to the router's auxiliary loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from moslora.config import CONFIG_NAME, WEIGHTS_NAME, MoSLoraConfig
from moslora.files import write_bytes_atomic
from moslora.layer import ADAPTER_PREFIX, MoSLoraLinear
from moslora.routing import SharedRouting

logger = logging.getLogger(__name__)

# Parameter containers saved for each adapter, as ``<module path>.<container>``.
_SAVED = MoSLoraLinear.adapter_layer_names


class MoSLoraWarning(UserWarning):
    """Warnings about adapter use that is valid but probably not what was meant."""


def _matches(path: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == target or path.endswith("." + target) for target in targets)


def _linear_names(model: nn.Module) -> list[str]:
    """Distinct last components of the paths of all linear layers, for error messages."""
    names = {
        path.rsplit(".", 1)[-1]
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    return sorted(names)


def inject_adapter(model: nn.Module, config: MoSLoraConfig, adapter_name: str) -> list[str]:
    """Add adapter ``adapter_name`` to every module matched by ``config.target_modules``.

    Returns the paths of the adapted modules. Raises ``ValueError`` when nothing matches or a
    match is not a linear layer.
    """
    adapted = []
    for path, module in list(model.named_modules()):
        if not path or ADAPTER_PREFIX in path or path.endswith(".base_layer"):
            continue
        if not _matches(path, config.target_modules):
            continue
        if isinstance(module, MoSLoraLinear):
            module.add_adapter(adapter_name, config)
        elif isinstance(module, nn.Linear):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            layer = MoSLoraLinear(module)
            layer.add_adapter(adapter_name, config)
            setattr(parent, child, layer)
        else:
            raise ValueError(
                f"target_modules matched {path!r}, a {type(module).__name__}; only torch.nn.Linear "
                "layers can be adapted. Narrow target_modules to linear layers."
            )
        adapted.append(path)
    if adapted and config.share_router and config.num_experts > 1:
        _share_routers(model, adapted, config, adapter_name)
    if not adapted:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of "
            f"{type(model).__name__}. Linear layers in this model are named: "
            f"{', '.join(_linear_names(model))}"
        )
    return adapted


def _share_routers(
    model: nn.Module, paths: list[str], config: MoSLoraConfig, adapter_name: str
) -> None:
    """Give the adapted modules of each router group one router and one routing cache."""
    groups: dict[tuple[str, int], list[MoSLoraLinear]] = {}
    for path in paths:
        parent, _, child = path.rpartition(".")
        for index, names in enumerate(config.router_groups):
            if child in names:
                groups.setdefault((parent, index), []).append(model.get_submodule(path))
    for members in groups.values():
        if len(members) < 2:
            continue
        router = members[0].moslora_router[adapter_name]
        cache = SharedRouting()
        for layer in members:
            layer.moslora_router[adapter_name] = router
            layer.shared_routing[adapter_name] = cache


class MoSLoraModel(nn.Module):
    """A transformers model with MoSLoRA adapters injected into its linear layers.

    Attribute access falls through to the base model, so ``config``, ``generate`` and
    ``gradient_checkpointing_enable`` work as on the base model.
    """

    # The Trainer passes num_items_in_batch through to the base model's loss.
    accepts_loss_kwargs = True

    def __init__(
        self, model: nn.Module, config: MoSLoraConfig, adapter_name: str = "default"
    ) -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, MoSLoraConfig] = {}
        self.active_adapter = adapter_name
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- adapters ---------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: MoSLoraConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
            raise ValueError(
                f"adapter name {adapter_name!r} is invalid; use letters, digits, '_' and '-'"
            )
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(
                getattr(self.base_model, "config", None), "_name_or_path", None
            )
        inject_adapter(self.base_model, config, adapter_name)
        self.peft_config[adapter_name] = config
        if len(self.peft_config) == 1:
            self.set_adapter(adapter_name)
        else:
            # A new adapter stays inactive, as in PEFT, until set_adapter selects it.
            self.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter; only its parameters are trainable."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} not found; adapters: {', '.join(self.peft_config)}"
            )
        self.active_adapter = adapter_name
        for layer in self.adapter_layers():
            layer.active_adapter = adapter_name if adapter_name in layer.adapter_configs else None
            for name in layer.adapter_configs:
                config = layer.adapter_configs[name]
                active = name == adapter_name
                layer.moslora_A[name].requires_grad_(active)
                layer.moslora_B[name].requires_grad_(active)
                layer.moslora_curvature[name].requires_grad_(active and config.learn_curvature)
                layer.moslora_log_scale[name].requires_grad_(active and config.learn_input_scale)
                if name in layer.moslora_router:
                    layer.moslora_router[name].requires_grad_(active)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found")
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block."""
        layers = list(self.adapter_layers())
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False

    def adapter_layers(self) -> Iterator[MoSLoraLinear]:
        for module in self.base_model.modules():
            if isinstance(module, MoSLoraLinear):
                yield module

    def named_adapter_layers(self) -> Iterator[tuple[str, MoSLoraLinear]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, MoSLoraLinear):
                yield path, module

    # ---- forward and the router's auxiliary loss --------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def router_aux_loss(self) -> torch.Tensor | None:
        """Mean over routed layers of the last forward pass's load-balancing loss.

        None when the active adapter has a single expert (no router). The loss of each layer is
        the one of its most recent forward pass, so call this right after the forward pass whose
        loss it should join.
        """
        losses = [
            layer.aux_loss
            for layer in self.adapter_layers()
            if layer.active_adapter is not None and layer.aux_loss is not None
        ]
        if not losses:
            return None
        return torch.stack([loss.to(losses[0].device) for loss in losses]).mean()

    def routing_statistics(self) -> dict[str, dict[str, list[float]]]:
        """Per adapted module, the mean router probability and dispatch fraction per expert."""
        stats = {}
        for path, layer in self.named_adapter_layers():
            if layer.routing_stats is not None:
                stats[path] = {key: value.tolist() for key, value in layer.routing_stats.items()}
        return stats

    def curvatures(self) -> dict[str, list[float]]:
        """Per adapted module, the current curvature of each expert of the active adapter."""
        return {
            path: layer.curvature().detach().tolist()
            for path, layer in self.named_adapter_layers()
            if layer.active_adapter is not None
        }

    def mean_curvature_by_kind(self) -> dict[str, float]:
        """Mean curvature over all layers for each expert kind of the active adapter."""
        config = self.peft_config[self.active_adapter]
        values: dict[str, list[float]] = {}
        for curvature in self.curvatures().values():
            for kind, k in zip(config.experts, curvature, strict=True):
                values.setdefault(kind, []).append(k)
        return {kind: sum(ks) / len(ks) for kind, ks in values.items() if kind != "euclidean"}

    @torch.no_grad()
    def calibrate_input_scale(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Set every layer's input scale to the median input norm seen on a batch.

        Runs the base model once on the given inputs (the adapters are bypassed). Keeps the
        curved maps out of saturation for real activations, whose norms differ from
        ``sqrt(in_features)`` by layer. Returns the new scales by module path.
        """
        name = self.active_adapter
        norms: dict[str, torch.Tensor] = {}
        hooks = []
        attention_mask = kwargs.get("attention_mask")

        def record(path: str):
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                token_norms = inputs[0].float().norm(dim=-1)
                if attention_mask is not None and token_norms.shape == attention_mask.shape:
                    token_norms = token_norms[attention_mask.bool()]
                norms[path] = token_norms.flatten().median()

            return hook

        for path, layer in self.named_adapter_layers():
            hooks.append(layer.base_layer.register_forward_pre_hook(record(path)))
        try:
            with self.disable_adapter():
                self.base_model(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        scales = {}
        for path, layer in self.named_adapter_layers():
            if path in norms and name in layer.moslora_log_scale:
                value = norms[path].clamp_min(1e-3)
                layer.moslora_log_scale[name].copy_(value.log())
                scales[path] = float(value)
        return scales

    # ---- parameters -------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def adapter_state_dict(
        self,
        adapter_name: str | None = None,
        full_state_dict: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed ``<module path>.<container>[.<sub key>]``, no name.

        ``full_state_dict`` is a state dict of this whole wrapper gathered elsewhere (FSDP's
        full state dict, DeepSpeed's consolidated one); the adapter's tensors are then taken
        from it instead of from the local parameters, which may be shards.
        """
        name = adapter_name or self.active_adapter
        state = {}
        for path, layer in self.named_adapter_layers():
            if name not in layer.adapter_configs:
                continue
            for container in _SAVED:
                holder = getattr(layer, container)
                if name not in holder:
                    continue
                value = holder[name]
                local = value.state_dict() if isinstance(value, nn.Module) else {"": value}
                for key, tensor in local.items():
                    suffix = f".{key}" if key else ""
                    if full_state_dict is not None:
                        tensor = full_state_dict[f"base_model.{path}.{container}.{name}{suffix}"]
                    state[f"{path}.{container}{suffix}"] = tensor.detach().clone().contiguous()
        return state

    # ---- saving and loading -----------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write each adapter as ``adapter_model.safetensors`` plus ``adapter_config.json``.

        The adapter named "default" goes to ``save_directory`` itself and any other adapter to
        the subfolder of its name, as in PEFT. Each file is written under a temporary name and
        renamed into place, weights first and config last, so a folder whose config exists
        always has complete weights. ``state_dict``, when given, is a full state dict of this
        wrapper to take the tensors from (see ``adapter_state_dict``).
        """
        root = Path(save_directory)
        names = selected_adapters or list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(
                    f"adapter {name!r} not found; adapters: {', '.join(self.peft_config)}"
                )
            folder = root if name == "default" else root / name
            folder.mkdir(parents=True, exist_ok=True)
            tensors = self.adapter_state_dict(name, state_dict)
            state = {key: value.cpu() for key, value in tensors.items()}
            write_bytes_atomic(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
            self.peft_config[name].save(folder)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> MoSLoraModel:
        """Load a saved adapter onto a fresh base model (in eval mode unless ``is_trainable``)."""
        config = MoSLoraConfig.load(adapter_path)
        wrapped = cls(model, config, adapter_name)
        wrapped._load_weights(adapter_path, adapter_name)
        if not is_trainable:
            for parameter in wrapped.parameters():
                parameter.requires_grad_(False)
            wrapped.eval()
        return wrapped

    def load_adapter(
        self, adapter_path: str | os.PathLike, adapter_name: str, is_trainable: bool = False
    ) -> None:
        config = MoSLoraConfig.load(adapter_path)
        self.add_adapter(adapter_name, config)
        self._load_weights(adapter_path, adapter_name)
        if not is_trainable:
            for layer in self.adapter_layers():
                for container in _SAVED:
                    holder = getattr(layer, container)
                    if adapter_name in holder:
                        holder[adapter_name].requires_grad_(False)

    def _load_weights(self, adapter_path: str | os.PathLike, adapter_name: str) -> None:
        path = Path(adapter_path) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an adapter folder contains {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        try:
            saved = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors file ({error}); save the adapter again"
            ) from error
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit this model: {len(missing)} tensor(s) missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
                "Was the adapter made for another base model or other target_modules?"
            )
        for key, tensor in saved.items():
            if tensor.shape != expected[key].shape:
                base = self.peft_config[adapter_name].base_model_name_or_path
                raise ValueError(
                    f"{path}: tensor {key} has shape {tuple(tensor.shape)} but this model needs "
                    f"{tuple(expected[key].shape)}; the adapter was made for another base model "
                    f"(recorded base: {base})"
                )
        with torch.no_grad():
            for module_path, layer in self.named_adapter_layers():
                for container in _SAVED:
                    holder = getattr(layer, container)
                    if adapter_name not in holder:
                        continue
                    value = holder[adapter_name]
                    prefix = f"{module_path}.{container}"
                    if isinstance(value, nn.Module):
                        value.load_state_dict(
                            {
                                key[len(prefix) + 1 :]: t
                                for key, t in saved.items()
                                if key.startswith(prefix + ".")
                            }
                        )
                    else:
                        value.copy_(saved[prefix])

    # ---- merging ----------------------------------------------------------------------------

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain base model.

        Only an adapter that is one linear map (a single Euclidean expert) can be merged; any
        other raises ``ValueError`` before anything changes.
        """
        name = self.active_adapter
        layers = list(self.named_adapter_layers())
        merged = {
            path: layer.merged_weight(name)
            for path, layer in layers
            if name in layer.adapter_configs
        }
        for path, layer in layers:
            if path in merged:
                with torch.no_grad():
                    layer.base_layer.weight.copy_(merged[path])
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model with its original linear layers."""
        for path, layer in list(self.named_adapter_layers()):
            parent_path, _, child = path.rpartition(".")
            parent = self.base_model.get_submodule(parent_path) if parent_path else self.base_model
            setattr(parent, child, layer.base_layer)
        return self.base_model


def get_moslora_model(
    model: nn.Module, config: MoSLoraConfig, adapter_name: str = "default"
) -> MoSLoraModel:
    """Wrap ``model`` with a new MoSLoRA adapter; only the adapter's parameters are trainable."""
    return MoSLoraModel(model, config, adapter_name)
