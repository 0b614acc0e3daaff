"""GenericAdapter: reads any model through its ``Layout`` and the norm recipes learned on a tiny model.

It is built only by ``generic_adapter`` (``reader``), once the recipes have reproduced the tiny model's
own attention (``proof``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import (
    AttentionAdapter,
    AttentionLayer,
    QKNorm,
    heads_from_bias,
    heads_from_linear,
    qk_norm_from_tensors,
)
from qkspectra.models.adapters.generic.layout import Layout
from qkspectra.models.adapters.generic.norms import NormRecipe
from qkspectra.models.adapters.generic.rotary import model_rotary
from qkspectra.models.adapters.generic.tables import CLIP_FIELDS
from qkspectra.models.tensors import TensorSource


class GenericAdapter(AttentionAdapter):
    """Reads a model through a ``Layout`` and the norm recipes learned on a tiny model of its class."""

    model_type = "generic"
    heads_tile_d_model = False

    def __init__(self, config: Any, layout: Layout, input_norm: NormRecipe | None,
                 query_norm: NormRecipe | None, key_norm: NormRecipe | None, verified_on: str,
                 interleaved: bool = False, qk_norm_after_rotary: bool = False, clip_after_qk_norm: bool = False,
                 scale_exponent: float = 0.5, unrotated_types: tuple = ()):
        self.config = config
        self.clip, self.clip_after_qk_norm = clip_of(config), clip_after_qk_norm
        self.qk_norm_after_rotary = qk_norm_after_rotary
        self.model_type = config.model_type
        self.layout, self.input_norm, self.query_norm, self.key_norm = layout, input_norm, query_norm, key_norm
        self.verified_on = verified_on
        # logit scale of the layers whose module exposes none: d_head ** -scale_exponent, the exponent learned
        # on the tiny model (0: no scale at all, as GPT-Neo's; 1/2: 1 / sqrt(d_head))
        self.scale_exponent = scale_exponent
        # layer types whose layers apply no rotary embedding though their modules do not say so (no ``use_rope``),
        # learned on the tiny model: EXAONE 4.0's and Cohere 2's "full_attention"
        self.unrotated_types = tuple(unrotated_types)
        self.num_layers = len(layout.scales)
        self.num_heads, self.num_kv_heads = layout.num_heads, layout.num_kv_heads
        self.d_model, self.d_head = layout.d_model, layout.d_head
        self.rotary_by_type = {}
        # longest window whose positions the rotary frequencies hold for (dynamic rope recomputes them beyond)
        self.frequency_limit: int | None = None
        if _has_rotary(config):
            for kind in set(layout.layer_types):
                rotary, limit = model_rotary(config, layout.rotary_class, self.d_head, kind)
                self.rotary_by_type[kind] = replace(rotary, interleaved=interleaved)
                if limit is not None:
                    self.frequency_limit = min(limit, self.frequency_limit or limit)
        # the one rotary embedding of every layer, if they all have the same (None where some layer has none)
        layers = {self._rotary(index) for index in range(self.num_layers)}
        self.rotary = next(iter(layers)) if len(layers) == 1 else None

    def rotated(self, index: int) -> bool:
        """Whether layer ``index`` applies the rotary embedding: its module's own switch (``use_rope``), else
        whether the proof found its layer type rotated (not in ``unrotated_types``)."""
        switch = self.layout.rotary_layers[index]
        return switch if switch is not None else self.layout.layer_types[index] not in self.unrotated_types

    def _rotary(self, index: int):
        """Layer ``index``'s rotary embedding: its kind's, None where it applies none (``rotated``)."""
        if not self.rotated(index):
            return None
        return self.rotary_by_type.get(self.layout.layer_types[index])

    def describe(self) -> str:
        return f"generic, verified on a tiny {self.verified_on}"

    def describe_positions(self) -> str:
        if not self.rotary_by_type:
            return "no rotary embedding (absolute positions, if any, added before layer 0)"
        parts = sorted({f"rotary on {r.rotary_dim} of {self.d_head} head dimensions, " + (
            f"base {r.base:g}" if r.inv_freq is None else f"{r.rope_type} frequencies (base {r.base:g} rescaled)")
            for r in self.rotary_by_type.values()})
        unrotated = [index for index in range(self.num_layers) if not self.rotated(index)]
        if unrotated:
            parts.append(f"no rotary embedding on layers {', '.join(map(str, unrotated))}")
        return "; ".join(parts)

    def check_sequence_length(self, seq_len: int) -> None:
        if self.frequency_limit is not None and seq_len > self.frequency_limit:
            raise QkspectraError(f"{self.model_type} uses dynamic rope, whose frequencies change beyond "
                                 f"{self.frequency_limit} tokens: a window of {seq_len} tokens cannot be read")

    def anchor_tensor(self) -> str:
        return f"{self.layout.attention.format(0)}.{self.layout.query}.weight"

    def separate_projections(self) -> tuple[str, str, str] | None:
        return self.layout.attention, self.layout.query, self.layout.key

    def _norm(self, tensors: TensorSource, recipe: NormRecipe, index: int, width: int, heads: int = 1):
        """(gain, bias) of a norm over ``width`` coordinates: (width,) each, or (heads, width) for a norm holding
        one row per head (stored as one tensor, or as one norm module per head: ``recipe.per_head``)."""
        if not recipe.has_gain:  # a norm without parameters: gain 1, no bias
            return np.ones(width), None
        stem = recipe.name.format(index)
        stems = [f"{stem}.{recipe.per_head}.{h}" for h in range(heads)] if recipe.per_head else [stem]
        gain = np.stack([self.read(tensors, f"{s}.weight", None) for s in stems]) + recipe.offset  # (n, ...)
        gain = gain if recipe.per_head else gain[0]
        if gain.shape[-1] != width or (recipe.per_head and gain.shape != (heads, width)):
            shape = gain.shape[1:] if recipe.per_head else gain.shape
            raise QkspectraError(f"tensor {stems[0]}.weight has shape {shape}, but the config implies ({width},)")
        if recipe.per_head and f"{self.prefixed(tensors, stem)}.{recipe.per_head}.{heads}.weight" in tensors.names():
            raise QkspectraError(f"norm {stem} holds more than the config's {heads} heads' norms")
        bias = None
        if recipe.has_bias:
            bias = np.stack([self.read(tensors, f"{s}.bias", gain.shape[1:] if recipe.per_head else gain.shape)
                             for s in stems])  # (n, ...) as the gain
            bias = bias if recipe.per_head else bias[0]
        return gain, bias

    def read(self, tensors: TensorSource, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
        if shape is not None:
            return super().read(tensors, name, shape)
        return tensors.get(self.prefixed(tensors, name))

    def _qk_norm(self, tensors: TensorSource, recipe: NormRecipe | None, index: int, heads: int) -> QKNorm | None:
        if recipe is None:
            return None
        over = "head" if recipe.per_head or self._per_head(tensors, recipe) else "projection"
        gain, bias = self._norm(tensors, recipe, index, self.d_head if over == "head" else heads * self.d_head, heads)
        return qk_norm_from_tensors(gain, bias, heads, eps=recipe.eps, over=over, centred=recipe.centred)

    def _per_head(self, tensors: TensorSource, recipe: NormRecipe) -> bool:
        stored = tensors.get(self.prefixed(tensors, f"{recipe.name.format(0)}.weight"))
        return stored.shape[-1] == self.d_head and not (stored.ndim == 1 and self.num_heads == 1)

    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        layout = self.layout
        attention = layout.attention.format(index)
        H, H_kv, dh, d = self.num_heads, self.num_kv_heads, self.d_head, self.d_model
        norm_gain = norm_bias = None
        if self.input_norm is not None:
            norm_gain, norm_bias = self._norm(tensors, self.input_norm, index, d)
        return AttentionLayer(
            W_Q=heads_from_linear(self.read(tensors, f"{attention}.{layout.query}.weight", (H * dh, d)), H),
            W_K=heads_from_linear(self.read(tensors, f"{attention}.{layout.key}.weight", (H_kv * dh, d)), H_kv),
            b_Q=heads_from_bias(self.read_optional(tensors, f"{attention}.{layout.query}.bias", (H * dh,)), H),
            b_K=heads_from_bias(self.read_optional(tensors, f"{attention}.{layout.key}.bias", (H_kv * dh,)), H_kv),
            scale=layout.scales[index] if layout.scales[index] is not None else dh ** -self.scale_exponent,
            norm_gain=norm_gain,
            norm_bias=norm_bias,
            rotary=self._rotary(index),
            q_norm=self._qk_norm(tensors, self.query_norm, index, H),
            k_norm=self._qk_norm(tensors, self.key_norm, index, H_kv),
            sliding_window=layout.windows[index],
            clip=self.clip,
            clip_after_qk_norm=self.clip_after_qk_norm,
            qk_norm_after_rotary=self.qk_norm_after_rotary,
        )


def _has_rotary(config: Any) -> bool:
    """Rotary positions: ``rope_parameters``, or (GPT-J) a ``rotary_dim`` without them."""
    params = getattr(config, "rope_parameters", None) or isinstance(getattr(config, "rotary_dim", None), int)
    return bool(params) and getattr(config, "position_embedding_type", "rope") in ("rope", "rotary", None)


def clip_of(config: Any) -> float | None:
    """The bound the config clamps every query, key and value coordinate to (``tables.CLIP_FIELDS``), or None."""
    return next((float(c) for c in (getattr(config, f, None) for f in CLIP_FIELDS) if c is not None), None)
