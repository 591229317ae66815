"""Mixture-of-Space LoRA: low-rank adapters whose experts live in spaces of learned curvature."""

__version__ = "0.1.0"

from moslora.config import MoSLoraConfig  # noqa: E402
from moslora.layer import MoSLoraLinear  # noqa: E402
from moslora.model import MoSLoraModel, MoSLoraWarning, get_moslora_model  # noqa: E402

__all__ = [
    "MoSLoraConfig",
    "MoSLoraLinear",
    "MoSLoraModel",
    "MoSLoraWarning",
    "__version__",
    "get_moslora_model",
]
