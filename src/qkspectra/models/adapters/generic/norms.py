"""How a model's norms apply their parameters, learned by probing the norm modules of a tiny model.

A norm is read as gain * n(z) + bias with n(z) = c / sqrt(mean(c ** 2) + eps), c = z (RMSNorm) or
z - mean(z) (LayerNorm), over the last dimension, and gain = offset + w for the stored weight w
(offset 1 for Gemma-style norms, else 0); a norm without parameters has gain 1. The epsilon is the
module's or the config's where the module agrees, else the one its output implies. A q/k norm may be a
container of one such norm per head (StableLM's ``StableLmLayerNormPerHead``, a ModuleList ``norms`` of
LayerNorms, norm h applied to head h): its recipe is its first member's, and its gain rows the members'
weights (``{name}.norms.{h}.weight``).
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
    has_gain: bool = True  # False: the module stores no weight (gain 1, bias 0), as OLMo's LayerNorm
    per_head: str | None = None  # child ModuleList of one norm per head (StableLM's "norms"), or None


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


def norm_recipe(module: Any, name: str, config: Any, width: int | None = None) -> NormRecipe | str:
    """How ``module`` applies its gain, probed on a random input; a line saying why not otherwise.

    A norm without a stored weight (OLMo's LayerNorm) has gain 1 and bias 0; ``width`` is then the number
    of coordinates it normalises (else its weight's shape says).
    """
    import torch

    weight = getattr(module, "weight", None)  # (width,) or None
    if weight is None and width is None:
        members = per_head_norms(module)
        if members is None:
            return f"norm {name} has no weight, so how many coordinates it normalises cannot be read"
        return _per_head_recipe(module, name, config, *members)
    bias = getattr(module, "bias", None)
    shape = (width,) if weight is None else tuple(weight.shape)
    dtype = torch.get_default_dtype() if weight is None else weight.dtype
    z = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    out = _output(module, z, dtype)
    w = 0.0 if weight is None else weight.detach().double()
    b = 0.0 if bias is None else bias.detach().double()
    stated = norm_eps(module, config)
    for centred in (False, True):
        centre = z - z.mean(-1, keepdim=True) if centred else z
        for offset in (0.0, 1.0) if weight is not None else (1.0,):
            if torch.allclose(normalised(centre, centred=False, eps=stated) * (offset + w) + b, out, rtol=1e-4, atol=1e-5):
                eps = _epsilon(module, centre, offset + w, b, stated, dtype)
                if eps is None:
                    return f"norm {name} ({type(module).__name__}) divides by an epsilon that cannot be told"
                return NormRecipe(name, offset, centred, bias is not None, eps, has_gain=weight is not None)
    return f"norm {name} ({type(module).__name__}) is neither an RMSNorm nor a LayerNorm of its last dimension"


def per_head_norms(module: Any) -> tuple[str, Any] | None:
    """(child name, ModuleList) of a container holding one weighted norm per head, or None."""
    from torch import nn

    for child, members in module.named_children():
        if isinstance(members, nn.ModuleList) and len(members) and all(
                getattr(m, "weight", None) is not None and m.weight.ndim == 1 and
                m.weight.shape == members[0].weight.shape for m in members):
            return child, members
    return None


def _per_head_recipe(module: Any, name: str, config: Any, child: str, members: Any) -> NormRecipe | str:
    """The recipe of a container applying ``members[h]`` to head h (axis 1 of (batch, heads, seq, d_head)),
    learned on its first member; a line saying why not if the members differ or the container does otherwise."""
    import torch

    recipes = [norm_recipe(member, f"{name}.{child}.{h}", config) for h, member in enumerate(members)]
    first = recipes[0]
    if isinstance(first, str):
        return first
    if any(isinstance(r, str) or (r.offset, r.centred, r.has_bias, r.eps) != (first.offset, first.centred,
                                                                           first.has_bias, first.eps) for r in recipes):
        return f"norm {name} ({type(module).__name__}) holds per-head norms that apply their parameters differently"
    heads, d_head = len(members), members[0].weight.shape[0]
    z = torch.randn(2, heads, 3, d_head, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dtype = members[0].weight.dtype
    try:
        out = _output(module, z, dtype)  # (2, heads, 3, d_head)
    except Exception:  # noqa: BLE001 - a container taking another shape is not one norm per head
        out = None
    expected = torch.stack([_output(member, z[:, h], dtype) for h, member in enumerate(members)], 1)
    if out is None or out.shape != expected.shape or not torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
        return f"norm {name} ({type(module).__name__}) does not apply its norm h to head h"
    return NormRecipe(name, first.offset, first.centred, first.has_bias, first.eps, per_head=child)


def _output(module: Any, z: Any, dtype: Any) -> Any:
    """The module's output for z, in float64."""
    import torch

    with torch.no_grad():
        return module(z.to(dtype)).double()


def _epsilon(module: Any, centre: Any, gain: Any, bias: Any, stated: float, dtype: Any) -> float | None:
    """The epsilon the norm divides by, checked on inputs whose mean square is ``stated`` (there it matters).

    ``stated`` (the module's or config's) if the module agrees; else the one its output implies (OLMo's
    LayerNorm keeps its 1e-5 in its code alone); None if that does not reproduce the module either.
    """
    import torch

    level = max(stated, 1e-8)
    small = centre * (level / centre.pow(2).mean(-1, keepdim=True)).sqrt()  # mean square `level`, mean kept
    out = _output(module, small, dtype) - bias  # gain * small / sqrt(level + eps)
    for eps in (stated, None):
        if eps is None:  # 1 / sqrt(level + eps), fitted row by row
            signal = small * gain
            inverse = (signal * out).sum(-1) / (signal * signal).sum(-1)
            eps = max(float(f"{float((inverse.pow(-2) - level).mean()):.3g}"), 0.0)
        if torch.allclose(normalised(small, centred=False, eps=eps) * gain, out, rtol=1e-4, atol=1e-5):
            return eps
    return None
