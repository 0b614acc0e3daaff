"""How a model's norms apply their parameters, learned by probing the norm modules of a tiny model.

A norm is read as gain * n(z) + bias with n(z) = c / sqrt(mean(c ** 2) + eps), c = z (RMSNorm) or
z - mean(z) (LayerNorm), over the last dimension, and gain = offset + w for the stored weight w
(offset 1 for Gemma-style norms, else 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qkspectra.models.adapters.generic.tables import CONFIG_EPS_FIELDS, EPS_ATTRIBUTES


@dataclass(frozen=True)
class NormRecipe:
    """How a norm module applies its parameters: gain = offset + weight, centred (LayerNorm) or not."""

    name: str  # tensor-name stem, with {} for the layer index
    offset: float
    centred: bool
    has_bias: bool
    eps: float


def norm_eps(module: Any, config: Any) -> float:
    """The norm's epsilon: its own attribute, else the config's, else 1e-6."""
    for name in EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    for name in CONFIG_EPS_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, float):
            return value
    return 1e-6


def normalised(z: Any, *, centred: bool, eps: float) -> Any:
    """n(z) = c / sqrt(mean(c ** 2) + eps) over the last dimension, c = z - mean(z) if ``centred`` else z.

    z: (..., width) torch tensor -> (..., width), in z's dtype.
    """
    import torch

    c = z - z.mean(-1, keepdim=True) if centred else z  # (..., width)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


def norm_recipe(module: Any, name: str, config: Any) -> NormRecipe | str:
    """How ``module`` applies its gain, probed on a random input; a line saying why not otherwise."""
    import torch

    weight = getattr(module, "weight", None)  # (width,)
    if weight is None:
        return f"norm {name} has no gain"
    bias = getattr(module, "bias", None)
    eps = norm_eps(module, config)
    z = torch.randn(3, *weight.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    with torch.no_grad():
        out = module(z.to(weight.dtype)).double()
    w = weight.detach().double()
    b = 0.0 if bias is None else bias.detach().double()
    for centred in (False, True):
        normal = normalised(z, centred=centred, eps=eps)  # (3, width)
        for offset in (0.0, 1.0):
            if torch.allclose(normal * (offset + w) + b, out, rtol=1e-4, atol=1e-5):
                return NormRecipe(name, offset, centred, bias is not None, eps)
    return f"norm {name} ({type(module).__name__}) is neither an RMSNorm nor a LayerNorm of its last dimension"
