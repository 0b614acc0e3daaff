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

Query/key norms (Gemma 3, Qwen3, OLMo 2, ...): with ``q_norm`` / ``k_norm`` set, each bracket
above is normalised (``QKNorm``) after the projection and before positions, so the logit is
scale * n_Q(x W_Q + b_Q) . n_K(y W_K + b_K). ``sliding_window`` W: a query sees only the last W
keys (itself included). ``models.adapters.attention`` computes queries and keys exactly as the
model forms its logits.
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
    (``rope_type`` other than "default" rescales these frequencies, never the logit). With
    ``interleaved``, coordinate 2i is paired with 2i + 1 instead. ``inv_freq`` holds the
    frequencies themselves where ``rope_type`` rescales them (computed by transformers' own rope
    functions from the config).
    """

    rotary_dim: int
    base: float
    rope_type: str
    interleaved: bool = False  # pairs (2i, 2i + 1) instead of (i, i + rotary_dim/2) (Cohere, GLM, Helium)
    inv_freq: tuple[float, ...] | None = None  # the pairs' frequencies where rope_type rescales them (linear, llama3)


@dataclass(frozen=True, eq=False)
class QKNorm:
    """A norm on the queries (or keys) of a layer, applied after the projection, before positions.

    For each group of coordinates it normalises (one head's d_head coordinates with ``over="head"``,
    all heads' together with ``over="projection"``), z -> gain * (z - c) / sqrt(mean((z - c)^2) + eps)
    + bias, with c the group's mean if ``centred`` (LayerNorm) else 0 (RMSNorm).
    """

    gain: np.ndarray  # (H or H_kv, d_head) effective gain (Gemma's 1 + w already added)
    bias: np.ndarray | None  # (H or H_kv, d_head), LayerNorm only
    eps: float
    over: str  # "head" or "projection"
    centred: bool

    def repeat_heads(self, num_heads: int) -> QKNorm:
        """The norm for key heads repeated to ``num_heads`` (a mean over repeated heads is the same mean)."""
        return replace(self, gain=expand_kv_heads(self.gain, num_heads), bias=expand_kv_heads(self.bias, num_heads))


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
    q_norm: QKNorm | None = None  # norm on the queries after projection (per head or whole projection)
    k_norm: QKNorm | None = None  # norm on the keys, one gain row per key head
    sliding_window: int | None = None  # a query sees only the last sliding_window keys (itself included)

    @property
    def has_qk_norm(self) -> bool:
        return self.q_norm is not None or self.k_norm is not None

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head, H / H_kv (1 without grouped-query attention)."""
        return self.W_Q.shape[0] // self.W_K.shape[0]

    def per_query_head(self) -> AttentionLayer:
        """The same layer with one key factor (and key bias) per query head: W_K (H, d_model, d_head)."""
        if self.kv_group_size == 1:
            return self
        num_heads = self.W_Q.shape[0]
        return replace(self, W_K=expand_kv_heads(self.W_K, num_heads), b_K=expand_kv_heads(self.b_K, num_heads),
                       k_norm=None if self.k_norm is None else self.k_norm.repeat_heads(num_heads))


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
    # Fields of LOGIT_CHANGING_FIELDS this adapter models (e.g. query_pre_attn_scalar in its scale).
    handled_fields: ClassVar[tuple[str, ...]] = ()
    num_layers: int
    num_heads: int
    num_kv_heads: int
    d_model: int
    d_head: int
    rotary: RotaryEmbedding | None = None  # rotary embedding of every layer, if the model has one

    def __init__(self, config: Any):
        self.config = config
        for field in LOGIT_CHANGING_FIELDS:
            if field in self.handled_fields:
                continue
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

    def check_sequence_length(self, seq_len: int) -> None:
        """Raise QkspectraError if attention over ``seq_len`` tokens differs from full (causal) attention."""

    def describe_positions(self) -> str:
        return "absolute position embeddings added before layer 0"

    def describe(self) -> str:
        """Which adapter reads the model, as the metadata records it."""
        return self.model_type

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


def rotary_from_config(config: Any, head_dim: int, layer_type: str | None = None) -> RotaryEmbedding:
    """The rotary embedding a config describes; QkspectraError for rope types that rescale logits.

    ``layer_type``: for configs whose ``rope_parameters`` hold one entry per layer type (Gemma 3).
    """
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get(layer_type or "full_attention"), dict):  # one entry per layer type
        params = params[layer_type or "full_attention"]
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
    inv_freq = None
    if rope_type in ("linear", "llama3"):  # "dynamic" changes nothing within the position table
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        frequencies, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
        inv_freq = tuple(float(f) for f in frequencies)
    return RotaryEmbedding(rotary_dim=rotary_dim, base=float(params["rope_theta"]), rope_type=rope_type,
                           inv_freq=inv_freq)


def qk_norm_from_tensors(gain: np.ndarray, bias: np.ndarray | None, num_heads: int, *, eps: float,
                         over: str, centred: bool = False) -> QKNorm:
    """A ``QKNorm`` from a norm's stored (effective) gain and bias, each (d_head,) shared by every
    head, (H, d_head) one per head, or (H * d_head,) over the whole projection (``over="projection"``)."""

    def rows(t: np.ndarray | None) -> np.ndarray | None:  # -> (H, d_head)
        if t is None:
            return None
        if over == "head" and t.ndim == 1:  # one vector shared by every head
            return np.tile(t.reshape(1, -1), (num_heads, 1))
        return t.reshape(num_heads, -1).copy()

    return QKNorm(gain=rows(gain), bias=rows(bias), eps=float(eps), over=over, centred=centred)


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
