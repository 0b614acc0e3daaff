"""The common per-layer layout every architecture adapter produces.

For head h of a layer, with x the vector entering the attention block (after its input norm
for pre-norm models) and positions ignored, the pre-softmax logit between query x and key y is

    logit = scale * (x @ W_Q[h] + b_Q[h]) . (y @ W_K[h] + b_K[h])

Grouped-query models store one key factor per key/value head: query head h reads key head
h // (H / H_kv), and ``per_query_head()`` gives the layer with that factor repeated for each
query head. Rotary models rotate both brackets by their position before the dot product (``rotary``).
``norm_gain`` / ``norm_bias`` are the affine parameters of the norm whose output is x, so
x = norm_gain * x_hat + norm_bias with x_hat the normalised vector (``None`` when no norm
feeds the block directly). Nothing downstream knows which architecture a layer came from.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from qkspectra.errors import QkspectraError
from qkspectra.models.tensors import TensorSource


@dataclass(frozen=True)
class RotaryEmbedding:
    """Rotary position embedding on q and k after projection (Hugging Face ``rotate_half`` layout).

    The first ``rotary_dim`` coordinates of each head are rotated; coordinate i < rotary_dim/2 is
    paired with i + rotary_dim/2 and turned by the angle position * base ** (-2 i / rotary_dim)
    (``rope_type`` other than "default" rescales these frequencies, never the logit).
    """

    rotary_dim: int
    base: float
    rope_type: str


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    W_Q: np.ndarray  # (H, d_model, d_head) float64
    W_K: np.ndarray  # (H_kv, d_model, d_head) float64, H_kv divides H; query head h reads W_K[h // (H / H_kv)]
    b_Q: np.ndarray | None  # (H, d_head)
    b_K: np.ndarray | None  # (H_kv, d_head)
    scale: float  # the model's own logit scale s
    norm_gain: np.ndarray | None  # (d_model,) gain of the norm whose output enters the block
    norm_bias: np.ndarray | None  # (d_model,) bias of that norm (LayerNorm), None for RMSNorm
    rotary: RotaryEmbedding | None

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head, H / H_kv (1 without grouped-query attention)."""
        return self.W_Q.shape[0] // self.W_K.shape[0]

    def per_query_head(self) -> AttentionLayer:
        """The same layer with one key factor (and key bias) per query head: W_K (H, d_model, d_head)."""
        if self.kv_group_size == 1:
            return self
        num_heads = self.W_Q.shape[0]
        return replace(self, W_K=expand_kv_heads(self.W_K, num_heads), b_K=expand_kv_heads(self.b_K, num_heads))


# Config fields that change the attention logit in ways no adapter models; any value other
# than None/False is refused (a quietly wrong number is worse than none).
LOGIT_CHANGING_FIELDS = (
    "alibi",
    "use_alibi",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "attention_multiplier",
    "use_qk_norm",
    "qk_layernorm",
    "use_logn_attn",
    "add_cross_attention",
)

# Rotary variants whose cos/sin carry no extra factor (attention_scaling == 1): they move
# positions but leave the metric alone. yarn and longrope multiply every logit, so they are refused.
PLAIN_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class AttentionAdapter(abc.ABC):
    """Maps one architecture's tensors to ``AttentionLayer``s. Subclasses set the shapes in ``__init__``."""

    model_type: ClassVar[str]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    d_model: int
    d_head: int
    rotary: RotaryEmbedding | None = None  # rotary embedding of every layer, if the model has one

    def __init__(self, config: Any):
        self.config = config
        for field in LOGIT_CHANGING_FIELDS:
            value = getattr(config, field, None)
            if value not in (None, False):
                raise QkspectraError(
                    f"{self.model_type} config sets {field}={value!r}, which changes the attention logit "
                    "and is not modelled by qkspectra"
                )
        self._prefix: str | None = None

    # Whether W_Q's d_head-sized blocks must tile d_model exactly (False where the config may
    # set head_dim independently of hidden_size, as Llama's does).
    heads_tile_d_model: ClassVar[bool] = True

    def check_dimensions(self) -> None:
        """QkspectraError naming the config's fault if its shapes cannot describe an attention layer."""
        for name in ("num_layers", "num_heads", "num_kv_heads", "d_model", "d_head"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise QkspectraError(f"{self.model_type} config: {name} is {value!r}, not a positive whole number")
        if self.num_heads % self.num_kv_heads:
            raise QkspectraError(f"{self.model_type} config: {self.num_heads} query heads cannot share "
                                 f"{self.num_kv_heads} key/value heads evenly")
        if self.heads_tile_d_model and self.num_heads * self.d_head != self.d_model:
            raise QkspectraError(f"{self.model_type} config: hidden size {self.d_model} is not a multiple of "
                                 f"{self.num_heads} attention heads")

    @abc.abstractmethod
    def layer(self, tensors: TensorSource, index: int) -> AttentionLayer:
        """Layer ``index`` (0-based, in execution order) read from ``tensors``."""

    def queries_and_keys(self, layer: AttentionLayer, hidden_states: Any,
                         position_embeddings: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
        """The layer's queries and keys as the model forms its logits, from the attention block's input.

        layer:               this layer with torch tensors in place of the arrays (``layer_as_torch``), as
                             stored (the norm feeding the block is already in ``hidden_states``)
        hidden_states:       (B, T, d_model) torch tensor, what enters the attention block
        position_embeddings: the (cos, sin) the model hands its attention modules, each (B, T, rotary_dim);
                             needed for rotary layers
        returns              queries (B, H, T, d_head) with the scale s multiplied in, keys (B, H_kv, T, d_head),
                             so that the logit of query i and key j is queries[..., i, :] . keys[..., j, :]

        An architecture whose logits need more (per-head q/k norms, ...) overrides this.
        """
        queries = project_heads(hidden_states, layer.W_Q, layer.b_Q)  # (B, H, T, d_head)
        keys = project_heads(hidden_states, layer.W_K, layer.b_K)  # (B, H_kv, T, d_head)
        if layer.rotary is not None:
            if position_embeddings is None:
                raise QkspectraError(f"{self.model_type}: the attention block was given no rotary position embeddings")
            queries, keys = apply_rotary(queries, position_embeddings), apply_rotary(keys, position_embeddings)
        return queries * layer.scale, keys

    def check_sequence_length(self, seq_len: int) -> None:
        """Raise QkspectraError if attention over ``seq_len`` tokens differs from full (causal) attention."""

    def describe_positions(self) -> str:
        return "absolute position embeddings added before layer 0"

    def prefixed(self, tensors: TensorSource, name: str) -> str:
        """``name`` with the checkpoint's module prefix (``""``, ``"model."``, ``"bert."``, ...)."""
        if self._prefix is None:
            anchor = self.anchor_tensor()
            candidates = sorted(
                (n[: -len(anchor)] for n in tensors.names() if n.endswith(anchor)), key=len
            )
            candidates = [c for c in candidates if c == "" or c.endswith(".")]
            if not candidates:
                raise QkspectraError(
                    f"no tensor named like {anchor!r} in the checkpoint; is it really a {self.model_type} model?"
                )
            self._prefix = candidates[0]
        return self._prefix + name

    @abc.abstractmethod
    def anchor_tensor(self) -> str:
        """A tensor name every checkpoint of this architecture has (used to find the prefix)."""

    def read(self, tensors: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name``; QkspectraError unless its shape is ``shape`` (what the config implies)."""
        full = self.prefixed(tensors, name)
        tensor = tensors.get(full)
        if tensor.shape != shape:
            raise QkspectraError(f"tensor {full!r} has shape {tuple(tensor.shape)}, but the config implies {shape}")
        return tensor

    def read_optional(self, tensors: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        full = self.prefixed(tensors, name)
        return self.read(tensors, name, shape) if full in tensors.names() else None


def rotary_from_config(config: Any, head_dim: int) -> RotaryEmbedding:
    """The rotary embedding a config describes; QkspectraError for rope types that rescale logits."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in PLAIN_ROPE_TYPES:
        raise QkspectraError(
            f"{config.model_type} config uses rope_type={rope_type!r}, whose attention factor rescales the "
            f"logits; supported rope types: {', '.join(PLAIN_ROPE_TYPES)}"
        )
    if params.get("attention_factor", 1.0) != 1.0:
        raise QkspectraError(
            f"{config.model_type} config sets rope attention_factor={params['attention_factor']}, which rescales "
            "the logits and is not modelled by qkspectra"
        )
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return RotaryEmbedding(rotary_dim=rotary_dim, base=float(params["rope_theta"]), rope_type=rope_type)


def heads_from_linear(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """nn.Linear weight (num_heads*d_head, d_model) -> per-head factors (num_heads, d_model, d_head)."""
    out_features, d_model = weight.shape
    return weight.reshape(num_heads, out_features // num_heads, d_model).transpose(0, 2, 1)


def heads_from_bias(bias: np.ndarray | None, num_heads: int) -> np.ndarray | None:
    """Bias (num_heads*d_head,) -> (num_heads, d_head)."""
    return None if bias is None else bias.reshape(num_heads, -1)


def expand_kv_heads(per_kv_head: np.ndarray | None, num_heads: int) -> np.ndarray | None:
    """(H_kv, ...) -> (H, ...): query head h reads kv head h // (H / H_kv)."""
    if per_kv_head is None:
        return None
    return np.repeat(per_kv_head, num_heads // per_kv_head.shape[0], axis=0)


def project_heads(hidden_states: Any, W: Any, b: Any | None) -> Any:
    """(B, T, d_model) @ per-head factors W (H, d_model, d_head) [+ b (H, d_head)] -> (B, H, T, d_head), torch."""
    heads, d_model, d_head = W.shape
    projected = hidden_states @ W.permute(1, 0, 2).reshape(d_model, heads * d_head)  # (B, T, H d_head)
    if b is not None:
        projected = projected + b.reshape(-1)
    return projected.unflatten(-1, (heads, d_head)).transpose(1, 2)


def apply_rotary(x: Any, position_embeddings: tuple[Any, Any]) -> Any:
    """Rotate the first rotary_dim coordinates of x (B, heads, T, d_head) by (cos, sin) (B, T, rotary_dim).

    Hugging Face's ``rotate_half`` layout: coordinate i < rotary_dim/2 pairs with i + rotary_dim/2.
    """
    import torch

    cos, sin = (t.to(x.dtype).unsqueeze(1) for t in position_embeddings)  # (B, 1, T, rotary_dim)
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]  # (B, heads, T, rotary_dim), (..., rest)
    first, second = rotated.chunk(2, dim=-1)
    turned = rotated * cos + torch.cat([second.neg(), first], dim=-1) * sin
    return turned if passed.shape[-1] == 0 else torch.cat([turned, passed], dim=-1)
