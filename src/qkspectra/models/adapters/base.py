"""The common per-layer layout every architecture adapter produces.

For head h, with x the vector entering the attention block, logit = scale * (x @ W_Q[h] + b_Q[h]) .
(y @ W_K[h] + b_K[h]) before positions; grouped-query layers keep one key factor per key/value head
(query head h reads h // (H / H_kv)). An adapter also writes query/key weights back into a loaded
model and gives each query head its own key/value head there (the functional test).

The layout in full (norms, q/k norms, rotary, sliding windows): docs/method/adapter_layout.md.
"""

from __future__ import annotations

import abc
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from qkspectra.errors import QkspectraError
from qkspectra.models.tensors import TensorSource

if TYPE_CHECKING:
    from torch import nn


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
    interleaved: bool = False  # pairs (2i, 2i + 1) instead of (i, i + rotary_dim/2) (Cohere, GLM, Helium, GPT-J)
    inv_freq: tuple[float, ...] | None = None  # the pairs' frequencies where rope_type rescales them (linear, llama3)


@dataclass(frozen=True, eq=False)
class QKNorm:
    """A norm on the queries (or keys) of a layer, applied after the projection, before positions
    (after them where the layer says ``qk_norm_after_rotary``).

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
    clip: float | None = None  # each query and key coordinate clamped to [-clip, clip] after projection (clip_qkv)
    clip_after_qk_norm: bool = False  # the clip applied to the normalised queries and keys (OLMoE), not before the norm
    qk_norm_after_rotary: bool = False  # q/k norms applied to the rotated queries and keys (HunYuan), not before

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


def fold_norm(layer: AttentionLayer) -> AttentionLayer:
    """The same layer seen from the normalised vector x_hat (norm gain and bias folded in).

    A layer with no norm feeding it is returned unchanged.
    """
    if layer.norm_gain is None:
        return layer
    g = layer.norm_gain[None, :, None]  # (1, d_model, 1)

    def folded_bias(bias: np.ndarray | None, W: np.ndarray) -> np.ndarray | None:
        if layer.norm_bias is None:
            return bias
        shift = np.einsum("d,hde->he", layer.norm_bias, W)  # (H, d_head)
        return shift if bias is None else bias + shift

    return replace(
        layer,
        W_Q=g * layer.W_Q,
        W_K=g * layer.W_K,
        b_Q=folded_bias(layer.b_Q, layer.W_Q),
        b_K=folded_bias(layer.b_K, layer.W_K),
        norm_gain=None,
        norm_bias=None,
    )


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


class ParameterAccess(Protocol):
    """A loaded model's parameters, read and overwritten as numpy arrays by their checkpoint names."""

    def get(self, name: str) -> np.ndarray: ...

    def set(self, name: str, value: np.ndarray) -> None: ...


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
        """``name`` with the module prefix of ``tensors`` (``""``, ``"model."``, ``"bert."``, ...).

        Found once per tensor source: a checkpoint saved with a task head and the bare model loaded
        from it name the same tensors with different prefixes.
        """
        prefixes = self.__dict__.setdefault("_prefixes", weakref.WeakKeyDictionary())
        if tensors not in prefixes:
            anchor = self.anchor_tensor()
            candidates = sorted(
                (n[: -len(anchor)] for n in tensors.names() if n.endswith(anchor)), key=len
            )
            candidates = [c for c in candidates if c == "" or c.endswith(".")]
            if not candidates:
                raise QkspectraError(
                    f"no tensor named like {anchor!r} in the checkpoint; is it really a {self.model_type} model?"
                )
            prefixes[tensors] = candidates[0]
        return prefixes[tensors] + name

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_prefixes"}

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

    def separate_projections(self) -> tuple[str, str, str] | None:
        """(attention, query, key): the module holding separate query and key nn.Linear projections
        (``{}`` for the layer index) and their names in it; None where there are none to write."""
        return None

    def can_write_query_key(self) -> bool:
        """Whether ``write_query_key`` can write this architecture's layers."""
        return self.separate_projections() is not None

    def write_query_key(self, parameters: ParameterAccess, index: int, W_Q: np.ndarray, W_K: np.ndarray,
                        b_Q: np.ndarray | None, b_K: np.ndarray | None) -> None:
        """Overwrite layer ``index``'s query/key weights W_Q, W_K (H, d_model, d_head) and biases b_Q, b_K
        (H, d_head) or None in a loaded model with one key head per query head; here through
        ``separate_projections``."""
        attention, query, key = self.separate_projections()
        prefix = attention.format(index)
        for part, W, b in ((query, W_Q, b_Q), (key, W_K, b_K)):
            parameters.set(f"{prefix}.{part}.weight", linear_from_heads(W))
            if b is not None:
                parameters.set(f"{prefix}.{part}.bias", b.reshape(-1))

    def expand_kv_heads_in_place(self, model: nn.Module) -> None:
        """Give every query head of a loaded ``model`` its own key/value head (repeat_kv done in the weights;
        the same function); the modules' head counts and the config follow, so an adapter of the new config
        reads the new layout. Here: separate ``k_proj``/``v_proj`` repeated head by head."""
        from qkspectra.models.modules import attention_modules

        H = model.config.num_attention_heads
        for module in attention_modules(model):
            groups = getattr(module, "num_key_value_groups", 1)
            if groups == 1:
                continue
            if not (hasattr(module, "k_proj") and hasattr(module, "v_proj")):
                raise QkspectraError(f"cannot give each query head its own key head in {type(module).__name__}: "
                                     "no separate k_proj/v_proj")
            for name in ("k_proj", "v_proj"):
                old = getattr(module, name)
                setattr(module, name, repeated_heads(old, groups, old.out_features // (H // groups)))
            module.num_key_value_groups = 1
        if getattr(model.config, "num_key_value_heads", None) is not None:
            model.config.num_key_value_heads = H


def repeated_heads(linear: Any, groups: int, d_head: int) -> Any:
    """An nn.Linear with each head's rows of ``linear`` (out features: heads x d_head) repeated ``groups`` times."""
    import torch
    from torch import nn

    with torch.device("meta"):  # no initial weights: the repeated ones are the only new memory
        repeated = nn.Linear(linear.in_features, linear.out_features * groups, bias=linear.bias is not None,
                             dtype=linear.weight.dtype)
    weight = linear.weight.detach().view(-1, d_head, linear.in_features).repeat_interleave(groups, 0)
    repeated.weight = nn.Parameter(weight.reshape(-1, linear.in_features), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach().view(-1, d_head).repeat_interleave(groups, 0).reshape(-1)
        repeated.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return repeated


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
    rotary_dim = getattr(config, "rotary_dim", None)  # GPT-J's field, where rope_parameters has no factor
    if "partial_rotary_factor" in params or not isinstance(rotary_dim, int):
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = None
    if rope_type in ("linear", "llama3"):  # "dynamic" changes nothing within the position table
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        frequencies, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
        inv_freq = tuple(float(f) for f in frequencies)
    # GPT-J has no rope_parameters and fixes the base at RoPE's original 10000 in its code
    return RotaryEmbedding(rotary_dim=rotary_dim, base=float(params.get("rope_theta", 10000.0)), rope_type=rope_type,
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


def linear_from_heads(per_head: np.ndarray) -> np.ndarray:
    """Per-head factors (H, d_model, d_head) -> nn.Linear weight (H d_head, d_model); inverse of ``heads_from_linear``."""
    return per_head.transpose(0, 2, 1).reshape(-1, per_head.shape[1])


def heads_from_bias(bias: np.ndarray | None, num_heads: int) -> np.ndarray | None:
    """Bias (num_heads*d_head,) -> (num_heads, d_head)."""
    return None if bias is None else bias.reshape(num_heads, -1)


def expand_kv_heads(per_kv_head: np.ndarray | None, num_heads: int) -> np.ndarray | None:
    """(H_kv, ...) -> (H, ...): query head h reads kv head h // (H / H_kv)."""
    if per_kv_head is None:
        return None
    return np.repeat(per_kv_head, num_heads // per_kv_head.shape[0], axis=0)
