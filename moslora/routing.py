"""Token-level routing between experts: softmax weights, top-k selection, load balancing.

The auxiliary loss is the one of the Switch Transformer (Fedus, Zoph, Shazeer, "Switch
Transformers", JMLR 2022, section 2.2): ``E * sum_e f_e * P_e``, where ``f_e`` is the fraction
of tokens dispatched to expert ``e`` and ``P_e`` the mean router probability of ``e``. It is 1
for a perfectly uniform router and grows to ``E`` when one expert takes every token.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class RoutingOutput:
    """Router weights for one forward pass, and what the auxiliary loss needs."""

    weights: torch.Tensor  # (tokens, E) float32, rows sum to 1
    aux_loss: torch.Tensor  # () float32, differentiable in the router probabilities
    mean_probability: torch.Tensor  # (E,) P_e, detached
    dispatch_fraction: torch.Tensor  # (E,) f_e, detached


def route(logits: torch.Tensor, *, mode: str, top_k: int = 1) -> RoutingOutput:
    """Turn router logits of shape ``(tokens, E)`` into mixing weights.

    ``mode='dense'`` returns the softmax. ``mode='topk'`` keeps the ``top_k`` largest
    probabilities of each token and renormalises them. Tokens count as dispatched to their
    ``top_k`` experts (to the arg-max expert for 'dense'), each with weight ``1 / top_k``.
    """
    probabilities = torch.softmax(logits.float(), dim=-1)  # (tokens, E)
    num_experts = probabilities.shape[-1]
    dispatched = top_k if mode == "topk" else 1
    chosen = probabilities.topk(dispatched, dim=-1).indices  # (tokens, dispatched)
    if mode == "topk":
        mask = torch.zeros_like(probabilities).scatter_(-1, chosen, 1.0)
        kept = probabilities * mask
        weights = kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    elif mode == "dense":
        weights = probabilities
    else:
        raise ValueError(f"unknown router mode {mode!r}; allowed: dense, topk")

    flat = probabilities.reshape(-1, num_experts)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    counts.scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device))
    fraction = counts / max(flat.shape[0] * dispatched, 1)
    mean_probability = flat.mean(dim=0)
    aux_loss = num_experts * (fraction * mean_probability).sum()
    return RoutingOutput(
        weights=weights,
        aux_loss=aux_loss,
        mean_probability=mean_probability.detach(),
        dispatch_fraction=fraction,
    )


class SharedRouting:
    """One router evaluation reused by the modules of a group during a forward pass.

    The first module of the group to see an input tensor computes the routing and stores it;
    the others find it by the identity and version of that same tensor object. A new forward
    pass (or the recomputation of gradient checkpointing) brings a new tensor, so the routing
    is computed again.
    """

    def __init__(self) -> None:
        self._key: weakref.ref | None = None
        self._version = -2
        self._output: RoutingOutput | None = None

    def lookup(self, x: torch.Tensor) -> RoutingOutput | None:
        if self._key is not None and self._key() is x and self._version == _version(x):
            return self._output
        return None

    def store(self, x: torch.Tensor, output: RoutingOutput) -> None:
        self._key = weakref.ref(x)
        self._version = _version(x)
        self._output = output


def _version(x: torch.Tensor) -> int:
    # Tensors made under torch.inference_mode have no version counter.
    return -1 if x.is_inference() else x._version
