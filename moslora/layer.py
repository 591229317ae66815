"""The MoSLoRA linear layer: a frozen ``nn.Linear`` plus a mixture of curved low-rank experts.

Expert ``e`` of rank ``r`` and curvature ``k_e`` computes

    Delta_e(x) = s * logmap0_k( project_k( B_e A_e expmap0_k(x / s) ) )

where ``s`` is the layer's input scale. All three maps are radial, so
``Delta_e(x) = c_e(x) * B_e A_e x`` for a per-token scalar ``c_e`` that depends only on
``|x|``, ``|B_e A_e x|`` and ``k_e``. The forward pass therefore runs every expert at once:

    h = A x                  one stacked down-projection      (tokens, E * r)
    c = gains(|x|^2, h)      per-token scalars, in float32    (tokens, E)
    out = B (h * g * c)      one stacked up-projection        (tokens, d_out)

``|B_e A_e x|^2`` comes from the Gram matrices ``B_e^T B_e`` (E of size r x r), so the
experts' full outputs are never formed separately. With ``k_e = 0``, ``c_e = 1`` exactly and
the expert is LoRA's ``B_e A_e x``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from moslora import geometry
from moslora.config import KIND_SIGN, MoSLoraConfig
from moslora.routing import SharedRouting, route

ADAPTER_PREFIX = "moslora_"


class MoSLoraLinear(nn.Module):
    """A frozen linear layer with one or more named MoSLoRA adapters, one of them active."""

    # Containers holding per-adapter tensors, keyed by adapter name.
    adapter_layer_names = (
        "moslora_A",
        "moslora_B",
        "moslora_curvature",
        "moslora_log_scale",
        "moslora_router",
    )

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoSLoraLinear wraps torch.nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.moslora_A = nn.ParameterDict()  # name -> (E * r, in_features)
        self.moslora_B = nn.ParameterDict()  # name -> (out_features, E * r)
        self.moslora_curvature = nn.ParameterDict()  # name -> (E,) unconstrained
        self.moslora_log_scale = nn.ParameterDict()  # name -> () log of the input scale s
        self.moslora_router = nn.ModuleDict()  # name -> Linear(in_features, E), when E > 1
        self.moslora_dropout = nn.ModuleDict()
        self.adapter_configs: dict[str, MoSLoraConfig] = {}
        # name -> the routing cache of this layer's router group, when the router is shared.
        self.shared_routing: dict[str, SharedRouting] = {}
        self.active_adapter: str | None = None
        self.disable_adapters = False
        # Set by each forward pass of the active adapter, read by the model wrapper.
        self.aux_loss: torch.Tensor | None = None
        self.routing_stats: dict[str, torch.Tensor] | None = None

    # ---- set-up ----------------------------------------------------------------------------

    def add_adapter(self, name: str, config: MoSLoraConfig) -> None:
        if name in self.adapter_configs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        experts, rank = config.num_experts, config.r
        device = self.base_layer.weight.device
        a = torch.empty(experts * rank, self.in_features, device=device, dtype=torch.float32)
        for block in a.split(rank):
            # Each expert's A gets LoRA's default init (Kaiming uniform with a = sqrt(5)).
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.moslora_A[name] = nn.Parameter(a)
        self.moslora_B[name] = nn.Parameter(
            torch.zeros(self.out_features, experts * rank, device=device, dtype=torch.float32)
        )
        self.moslora_curvature[name] = nn.Parameter(
            _raw_curvature(config, device), requires_grad=config.learn_curvature
        )
        scale = config.input_scale or math.sqrt(self.in_features)
        self.moslora_log_scale[name] = nn.Parameter(
            torch.tensor(math.log(scale), device=device), requires_grad=config.learn_input_scale
        )
        if experts > 1:
            router = nn.Linear(self.in_features, experts, device=device, dtype=torch.float32)
            nn.init.normal_(router.weight, std=0.01 / math.sqrt(self.in_features))
            nn.init.zeros_(router.bias)
            self.moslora_router[name] = router
        dropout = config.lora_dropout
        self.moslora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        signs = [KIND_SIGN[kind] if KIND_SIGN[kind] is not None else 0 for kind in config.experts]
        self.register_buffer(
            f"_kind_sign_{name}",
            torch.tensor(signs, dtype=torch.int8, device=device),
            persistent=False,
        )
        for flag in ("free", "lorentz"):
            self.register_buffer(
                f"_kind_{flag}_{name}",
                torch.tensor([kind == flag for kind in config.experts], device=device),
                persistent=False,
            )
        self.adapter_configs[name] = config
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        for container in (*self.adapter_layer_names, "moslora_dropout"):
            holder = getattr(self, container)
            if name in holder:
                del holder[name]
        for buffer in (f"_kind_sign_{name}", f"_kind_free_{name}", f"_kind_lorentz_{name}"):
            self._buffers.pop(buffer, None)
        self.adapter_configs.pop(name, None)
        self.shared_routing.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapter_configs), None)

    # ---- the parameters in their constrained form -------------------------------------------

    def curvature(self, name: str | None = None) -> torch.Tensor:
        """Curvature of each expert, shape (E,), float32, with |k| <= max_curvature.

        A signed kind uses ``k = sign * max * sigmoid(raw)``; a free expert ``max * tanh(raw)``;
        a Euclidean expert is exactly 0.
        """
        name = name or self.active_adapter
        config = self.adapter_configs[name]
        raw = self.moslora_curvature[name].float()
        sign = getattr(self, f"_kind_sign_{name}").float()
        free = getattr(self, f"_kind_free_{name}")
        bound = config.max_curvature
        return torch.where(free, bound * torch.tanh(raw), sign * bound * torch.sigmoid(raw))

    def input_scale(self, name: str | None = None) -> torch.Tensor:
        name = name or self.active_adapter
        return self.moslora_log_scale[name].float().exp()

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        name = self.active_adapter
        if self.disable_adapters or name is None:
            return result
        update = self._update(x, name)
        return result + update.to(result.dtype)

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Compute the scaled, routed sum of expert updates: float32, shape (..., out_features)."""
        config = self.adapter_configs[name]
        experts, rank = config.num_experts, config.r
        leading = x.shape[:-1]
        x_flat = x.reshape(-1, self.in_features).float()  # (N, d_in)
        x_drop = self.moslora_dropout[name](x_flat)
        a = self.moslora_A[name].float()  # (E*r, d_in)
        b = self.moslora_B[name].float()  # (d_out, E*r)
        h = (x_drop @ a.t()).view(-1, experts, rank)  # (N, E, r)

        mix = torch.full((h.shape[0], experts), config.scaling, device=h.device)  # (N, E)
        if not config.is_euclidean:
            mix = mix * self._gains(x_drop, h, b, name)
        if experts > 1:
            shared = self.shared_routing.get(name)
            routing = shared.lookup(x) if shared is not None else None
            reused = routing is not None
            if routing is None:
                logits = self.moslora_router[name](x_flat)  # (N, E)
                routing = route(logits, mode=config.router, top_k=config.top_k)
                if shared is not None:
                    shared.store(x, routing)
            mix = mix * routing.weights
            # A shared evaluation contributes its aux loss once, through the module that ran it.
            self.aux_loss = None if reused else routing.aux_loss
            self.routing_stats = {
                "mean_probability": routing.mean_probability,
                "dispatch_fraction": routing.dispatch_fraction,
            }
        out = (h * mix.unsqueeze(-1)).reshape(-1, experts * rank) @ b.t()  # (N, d_out)
        return out.view(*leading, self.out_features)

    def _gains(self, x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        """Per-token expert gains ``c_e`` of shape (N, E), from the radial maps' factors."""
        config = self.adapter_configs[name]
        experts, rank = config.num_experts, config.r
        k = self.curvature(name)  # (E,)
        inv_scale_sq = torch.exp(-2 * self.moslora_log_scale[name].float())
        input_sq = x.pow(2).sum(-1, keepdim=True) * inv_scale_sq  # (N, 1) = |x / s|^2
        # |B_e A_e x / s|^2 through the Gram matrices, without forming each expert's output.
        b_blocks = b.view(self.out_features, experts, rank).permute(1, 0, 2)  # (E, d_out, r)
        gram = b_blocks.transpose(1, 2) @ b_blocks  # (E, r, r)
        h_gram = torch.einsum("nei,eij->nej", h, gram)  # (N, E, r)
        output_sq = (h_gram * h).sum(-1).clamp_min(0) * inv_scale_sq  # (N, E)
        gains = _compiled_expert_gains() if config.compile else geometry.expert_gains
        lorentz = getattr(self, f"_kind_lorentz_{name}") if "lorentz" in config.experts else None
        return gains(k, input_sq, output_sq, fast=config.transition == "fast", lorentz=lorentz)

    def reference_update(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """Compute the update expert by expert through the geometry maps, slowly, for tests.

        Same result as the fused forward pass, without dropout, in float32.
        """
        name = name or self.active_adapter
        config = self.adapter_configs[name]
        rank = config.r
        x32 = x.reshape(-1, self.in_features).float()
        k = self.curvature(name)
        scale = self.input_scale(name)
        if config.transition == "fast" and not all(kind == "lorentz" for kind in config.experts):
            raise NotImplementedError("reference_update covers the exact transition only")
        weights = None
        if config.num_experts > 1:
            logits = self.moslora_router[name](x32)
            weights = route(logits, mode=config.router, top_k=config.top_k).weights
        total = torch.zeros(x32.shape[0], self.out_features, device=x32.device)
        for e in range(config.num_experts):
            a_e = self.moslora_A[name][e * rank : (e + 1) * rank].float()
            b_e = self.moslora_B[name][:, e * rank : (e + 1) * rank].float()
            if config.experts[e] == "lorentz":
                # The low-rank map acts on the space coordinates of the hyperboloid point.
                point = geometry.lorentz_expmap0(x32 / scale, k=k[e])
                space = point[:, 1:] @ a_e.t() @ b_e.t()
                mapped = geometry.lorentz_lift(space, k=k[e])
                delta = scale * geometry.lorentz_logmap0(mapped, k=k[e])
            else:
                y = geometry.expmap0(x32 / scale, k=k[e])
                w = geometry.project(y @ a_e.t() @ b_e.t(), k=k[e])
                delta = scale * geometry.logmap0(w, k=k[e])
            if weights is not None:
                delta = delta * weights[:, e : e + 1]
            total = total + config.scaling * delta
        return total.view(*x.shape[:-1], self.out_features)

    # ---- merging ----------------------------------------------------------------------------

    def merged_weight(self, name: str) -> torch.Tensor:
        """Base weight plus the adapter's update, for an adapter that is one linear map."""
        config = self.adapter_configs[name]
        if not config.is_euclidean or config.num_experts > 1:
            raise ValueError(_merge_error(config))
        delta = config.scaling * (self.moslora_B[name].float() @ self.moslora_A[name].float())
        weight = self.base_layer.weight
        return (weight.float() + delta).to(weight.dtype)

    def extra_repr(self) -> str:
        parts = []
        for name, config in self.adapter_configs.items():
            parts.append(f"{name}: experts={config.experts}, r={config.r}, router={config.router}")
        return "; ".join(parts)


@functools.cache
def _compiled_expert_gains():
    """``geometry.expert_gains`` compiled once per process, fusing its elementwise operations."""
    return torch.compile(geometry.expert_gains, dynamic=True)


def _raw_curvature(config: MoSLoraConfig, device: torch.device) -> torch.Tensor:
    """Unconstrained parameters that ``MoSLoraLinear.curvature`` maps to the initial curvatures."""
    raw = []
    bound = config.max_curvature
    for kind in config.experts:
        if kind == "euclidean":
            raw.append(0.0)
        elif kind == "free":
            raw.append(math.atanh(config.init_curvature["free"] / bound))
        else:
            fraction = abs(config.init_curvature[kind]) / bound
            raw.append(math.log(fraction / (1 - fraction)))
    return torch.tensor(raw, dtype=torch.float32, device=device)


def _merge_error(config: MoSLoraConfig) -> str:
    curved = [kind for kind in config.experts if kind != "euclidean"]
    if curved:
        reason = (
            f"its experts include non-Euclidean kinds ({', '.join(sorted(set(curved)))}), whose "
            "update is a nonlinear function of the input"
        )
    else:
        reason = (
            f"it mixes {config.num_experts} experts with token-dependent router weights, so the "
            "update is not one fixed matrix"
        )
    return (
        f"cannot merge this adapter into the base weights: {reason}. Only an adapter with a single "
        "Euclidean expert (experts=['euclidean']) merges exactly; keep the adapter unmerged."
    )
