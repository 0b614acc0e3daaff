"""TransformerLens models in memory: a ``TransformerBridge`` (TransformerLens 4) or a ``HookedTransformer``
(TransformerLens 3), read through TransformerLens's own API.

The metric comes from the weights the object computes with: each block's ``attn.W_Q`` (H, d_model,
d_head), its key weights per key/value head (``attn._W_K`` where TransformerLens keeps the grouped
ones apart, else ``attn.W_K``: (H_kv, d_model, d_head)), ``b_Q``/``b_K`` where the projections have
biases, and the gain (and bias) of the norm ``ln1`` feeding the block as the model holds it now.
Where TransformerLens already folded that norm into W_Q and W_K (``enable_compatibility_mode()``,
``fold_ln``), its gain is 1 and its bias 0, so folding it again changes nothing: nothing is ever
folded twice. What TransformerLens did to the weights is recorded in the metadata
(``processing_metadata``). The logit scale is the attention's own (``scaling`` of a transformers
attention, 1 / ``scale`` of TransformerLens's native one), else the config's ``attn_scale``.
A HookedTransformer's ``fold_ln`` (``process_weights_``, ``from_pretrained``'s default) also centres
W_Q and W_K over d_model after a LayerNorm (its ``LayerNormPre`` centres the stream): the metric read
is then P G W_Q W_K^T G P, not qkspectra's ``fold_ln`` G W_Q W_K^T G of the unprocessed weights.

The corpus pass (entropy from the model's own queries and keys at ``hook_q``/``hook_k``, after
rotary at ``hook_rot_q``/``hook_rot_k``) is ``extract.transformer_lens_capture``. The functional test
writes reconstructions into the nn.Linear projections a bridge's ``attn.q``/``attn.k`` wrap, or into a
HookedTransformer's own ``W_Q``, ``W_K`` (``_W_K``), ``b_Q``, ``b_K`` (``_b_K``) parameters
(``TransformerLensAdapter.write_query_key``), gives each query head its own key head in the model
(``expand_kv_heads_in_place``) and puts everything back after (``rewritten_in_place``); its passes
are ``analysis.reconstruction.transformer_lens_passes``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import (
    AttentionAdapter,
    AttentionLayer,
    ParameterAccess,
    RotaryEmbedding,
    linear_from_heads,
    repeated_heads,
)
from qkspectra.models.in_memory import InMemoryModel
from qkspectra.models.tensors import StateDictSource

MODEL_TYPE = "transformer_lens"
SUPPORTED_POSITIONS = ("standard", "rotary")


def is_transformer_lens(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens model object (a bridge or a HookedTransformer)."""
    return type(model).__module__.startswith("transformer_lens.") and hasattr(model, "cfg") and hasattr(model, "blocks")


@dataclass(frozen=True, eq=False)
class TransformerLensModel(InMemoryModel):
    """A TransformerLens model in memory, standing where a transformers model in memory would."""

    @property
    def config(self) -> Any:
        """What the extraction reads of a config: the model type, the layer count and the position table."""
        cfg = self.model.cfg
        return SimpleNamespace(model_type=MODEL_TYPE, num_hidden_layers=cfg.n_layers, n_positions=cfg.n_ctx)

    def tensors(self) -> StateDictSource:
        return StateDictSource(_BlockTensors(self.model))

    def adapter(self) -> TransformerLensAdapter:
        return TransformerLensAdapter(self.model)

    def processing_metadata(self) -> dict[str, Any]:
        """What TransformerLens did to the weights before qkspectra read them (the metadata's ``transformer_lens``)."""
        model, cfg = self.model, self.model.cfg
        gains = [_norm_parameters(block)[0] for block in model.blocks]
        biases = [_norm_parameters(block)[1] for block in model.blocks]
        folded = all(g is None or bool((g == 1).all()) for g in gains) and all(b is None or not b.any() for b in biases)
        # a bridge says; a HookedTransformer records nothing (None), only its normalization_type LNPre / RMSPre
        processed = getattr(model, "_weights_processed", None)
        return {
            "object": type(model).__name__,
            "weights_processed": processed,
            "compatibility_mode": getattr(model, "compatibility_mode", None),
            "normalization_type": cfg.normalization_type,
            "norm_folded_by_transformer_lens": folded and (processed or cfg.normalization_type in ("LNPre", "RMSPre")),
            "note": "the metric is that of the weights as TransformerLens holds them (folded and centred if it did "
                    "so); ln1's gain and bias are read as they are now (1 and 0 where TransformerLens folded them)",
        }


def transformer_lens_model(model: Any, tokenizer: Any | None) -> TransformerLensModel:
    """Wrap a TransformerLens model; its own tokenizer when none is given."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    parameter = next(model.parameters(), None)
    where = "" if parameter is None else f", {str(parameter.dtype).removeprefix('torch.')} on {parameter.device}"
    name = getattr(model.cfg, "model_name", None) or type(model).__name__
    return TransformerLensModel(model, tokenizer, name, f"TransformerLens model in memory: {type(model).__name__}{where} ({name})")


def _norm_parameters(block: Any) -> tuple[Any, Any]:
    """(gain, bias) torch tensors of the norm feeding the block's attention, None where it has none."""
    norm = getattr(block, "ln1", None)
    inner = getattr(norm, "original_component", None) or norm  # a bridge wraps the model's own module
    gain = getattr(inner, "weight", getattr(inner, "w", None))
    bias = getattr(inner, "bias", getattr(inner, "b", None))
    return (gain.detach() if gain is not None else None), (bias.detach() if bias is not None else None)


class _BlockTensors(Mapping):
    """The per-block tensors the adapter reads, by name, as the model holds them when this is made.

    Detached views of the model's own parameters where TransformerLens forms W_Q and W_K by reshaping
    them (no copies): the functional test writes into copies of the parameters it changes, so these
    keep the original weights while it runs.
    """

    def __init__(self, model: Any):
        self.model = model
        self._tensors = {f"blocks.{i}.{part}": value for i in range(model.cfg.n_layers)
                         for part in ("attn.W_Q", "attn.W_K", "attn.b_Q", "attn.b_K", "ln1.w", "ln1.b")
                         if (value := self._read(i, part)) is not None}

    def _read(self, index: int, part: str):
        block = self.model.blocks[index]
        if part.startswith("ln1."):
            return _norm_parameters(block)[part == "ln1.b"]
        attention, name = block.attn, part.removeprefix("attn.")
        if name in ("W_K", "b_K") and getattr(attention, f"_{name}", None) is not None:
            name = f"_{name}"  # a HookedTransformer's grouped key heads, before they are repeated
        try:
            value = getattr(attention, name)
        except AttributeError:  # a bridge's bias-free projection has no b_Q
            return None
        return None if value is None else value.detach()

    def __getitem__(self, name: str):
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors


class TransformerLensAdapter(AttentionAdapter):
    """Reads a TransformerLens model's layers through its own per-block ``W_Q``, ``W_K``, biases and ``ln1``."""

    model_type = MODEL_TYPE

    def __init__(self, model: Any):
        cfg = model.cfg
        super().__init__(SimpleNamespace(model_type=MODEL_TYPE))
        self.model = model
        self.num_layers, self.num_heads, self.d_model, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
        self.num_kv_heads = cfg.n_key_value_heads or cfg.n_heads
        check_supported(model)
        self.check_dimensions()
        self.rotary = rotary_of(model) if cfg.positional_embedding_type == "rotary" else None

    heads_tile_d_model = False  # TransformerLens configs may set d_head apart from d_model

    def anchor_tensor(self) -> str:
        return "blocks.0.attn.W_Q"

    def prefixed(self, tensors, name: str) -> str:
        return name  # the tensors are named by block, as TransformerLens names them

    def describe(self) -> str:
        return f"transformer_lens ({type(self.model).__name__})"

    def describe_positions(self) -> str:
        if self.rotary is None:
            return "absolute position embeddings added before layer 0"
        return f"rotary on {self.rotary.rotary_dim} of {self.d_head} head dimensions"

    def scale(self, index: int) -> float:
        """The logit scale s of layer ``index``: the attention's own where it keeps one, else the config's."""
        attention = self.model.blocks[index].attn
        inner = getattr(attention, "original_component", None)
        if isinstance(getattr(inner, "scaling", None), (int, float)):
            return float(inner.scaling)  # a transformers attention: logits q . k * scaling
        if isinstance(getattr(inner, "scale", None), (int, float)):
            return 1.0 / float(inner.scale)  # TransformerLens's native attention divides by scale
        cfg = self.model.cfg
        if not cfg.use_attn_scale:
            divisor = 1.0
        else:
            divisor = float(getattr(attention, "attn_scale", 0) or 0) or (
                cfg.attn_scale if cfg.attn_scale and cfg.attn_scale > 0 else math.sqrt(cfg.d_head))
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) and not hasattr(attention, "attn_scale"):
                divisor *= index + 1
        return 1.0 / divisor

    def layer(self, tensors, index: int) -> AttentionLayer:
        H, H_kv, D, dh = self.num_heads, self.num_kv_heads, self.d_model, self.d_head
        prefix = f"blocks.{index}."
        return AttentionLayer(
            W_Q=self.read(tensors, prefix + "attn.W_Q", (H, D, dh)),
            W_K=self.read(tensors, prefix + "attn.W_K", (H_kv, D, dh)),
            b_Q=self.read_optional(tensors, prefix + "attn.b_Q", (H, dh)),
            b_K=self.read_optional(tensors, prefix + "attn.b_K", (H_kv, dh)),
            scale=self.scale(index),
            norm_gain=self.read_optional(tensors, prefix + "ln1.w", (D,)),
            norm_bias=self.read_optional(tensors, prefix + "ln1.b", (D,)),
            rotary=self.rotary,
        )

    def unwritable(self) -> str | None:
        """Why the functional test cannot write this model's query/key weights (one line), or None."""
        from torch import nn

        for index, block in enumerate(self.model.blocks):
            if _hooked(block.attn):
                continue  # a HookedTransformer's W_Q and (_)W_K are parameters, written as they are
            for part in ("q", "k"):
                linear = getattr(getattr(block.attn, part, None), "original_component", None)
                if not isinstance(linear, nn.Linear):
                    return (f"the functional test cannot write {type(self.model).__name__} block {index}: its attention "
                            f"has no {part} projection wrapping an nn.Linear (as a TransformerBridge's do) and no W_Q "
                            "and W_K parameters (as a HookedTransformer's)")
        return None

    def can_write_query_key(self) -> bool:
        return self.unwritable() is None

    def write_query_key(self, parameters: ParameterAccess, index: int, W_Q: np.ndarray, W_K: np.ndarray,
                        b_Q: np.ndarray | None, b_K: np.ndarray | None) -> None:
        """Overwrite block ``index``'s W_Q, W_K (H, d_model, d_head) and b_Q, b_K (H, d_head) or None in the
        nn.Linear projections its attention's ``q`` and ``k`` wrap (what the model computes with), named by
        their module paths, or in a HookedTransformer's own parameters (key heads expanded first); the
        attention's own ``W_Q`` and ``W_K`` must then read back what was written."""
        import torch

        prefix = f"blocks.{index}.attn"
        attention = self.model.blocks[index].attn
        if _hooked(attention):  # a HookedTransformer: the parameters themselves, key heads one per query head by now
            for name, value in (("W_Q", W_Q), ("W_K", W_K), ("b_Q", b_Q), ("b_K", b_K)):
                if value is not None:
                    parameters.set(f"{prefix}.{_held_name(attention, name)}", value)
        else:
            for part, W, b in (("q", W_Q, b_Q), ("k", W_K, b_K)):
                parameters.set(f"{prefix}.{part}._original_component.weight", linear_from_heads(W))
                if b is not None:
                    parameters.set(f"{prefix}.{part}._original_component.bias", b.reshape(-1))
        for name, W in (("W_Q", W_Q), ("W_K", W_K)):
            held = getattr(attention, name).detach()  # (H, d_model, d_head) as TransformerLens reads it
            if not torch.equal(held.cpu(), torch.from_numpy(W).to(held.dtype)):
                raise QkspectraError(f"{type(self.model).__name__} block {index}: attn.{name} does not read back the "
                                     "weights written into its projection")

    def expand_kv_heads_in_place(self, model: Any) -> TransformerLensAdapter:
        """Give every query head its own key/value head (the repeat done in the weights; the same function):
        each block's ``k`` and ``v`` wrap projections with the key/value heads repeated, the attention
        repeats no more (``num_key_value_groups`` of a transformers attention, ``kv_repeats`` of
        TransformerLens's native one), the configs' ``n_key_value_heads`` and the hooks' head reshaping
        follow; a HookedTransformer's grouped parameters are repeated instead (``_expand_hooked_kv_heads``).
        Returns the adapter of the expanded model. ``rewritten_in_place`` puts everything back."""
        H = self.num_heads
        groups = H // self.num_kv_heads
        if all(_hooked(block.attn) for block in model.blocks):
            return self._expand_hooked_kv_heads(model, groups)
        for index, block in enumerate(model.blocks):
            attention = block.attn
            inner = attention.original_component
            if hasattr(inner, "num_key_value_groups"):  # a transformers attention
                inner.num_key_value_groups = 1
            elif hasattr(inner, "kv_repeats"):  # TransformerLens's native attention
                inner.kv_repeats, inner.n_kv_heads = 1, H
            else:
                raise QkspectraError(f"cannot give each query head its own key head in {type(model).__name__} block "
                                     f"{index}: {type(inner).__name__} repeats its key heads in a way not known here")
            for part in ("k", "v"):
                projection = getattr(attention, part)
                projection._modules["_original_component"] = repeated_heads(projection.original_component, groups,
                                                                             self.d_head)
            for config in {id(c): c for c in (model.cfg, attention.config, getattr(inner, "cfg", None))
                           if c is not None}.values():
                config.n_key_value_heads = H
            attention._setup_qkv_hook_reshaping()  # hook_k and hook_v: now H heads
        return TransformerLensAdapter(model)

    def _expand_hooked_kv_heads(self, model: Any, groups: int) -> TransformerLensAdapter:
        """``expand_kv_heads_in_place`` of a HookedTransformer: each grouped attention's ``_W_K``, ``_W_V``,
        ``_b_K`` and ``_b_V`` replaced by new parameters with the key/value heads repeated (as its ``W_K``
        property repeats them), its ``repeat_kv_heads`` 1, the config's ``n_key_value_heads`` the query heads."""
        import torch
        from torch import nn

        for index, block in enumerate(model.blocks):
            attention = block.attn
            if getattr(attention, "repeat_kv_heads", None) != groups:
                raise QkspectraError(f"cannot give each query head its own key head in {type(model).__name__} block "
                                     f"{index}: {type(attention).__name__} repeats its key heads in a way not known here")
            for name in ("_W_K", "_W_V", "_b_K", "_b_V"):
                held = attention._parameters[name]
                attention._parameters[name] = nn.Parameter(torch.repeat_interleave(held.detach(), groups, dim=0),
                                                           requires_grad=held.requires_grad)
            attention.repeat_kv_heads = 1
        model.cfg.n_key_value_heads = self.num_heads
        return TransformerLensAdapter(model)


def _hooked(attention: Any) -> bool:
    """Whether ``attention`` is a HookedTransformer's: its W_Q a parameter of its own, not a bridge's projection."""
    from torch import nn

    return isinstance(attention._parameters.get("W_Q"), nn.Parameter) and \
        isinstance(attention._parameters.get(_held_name(attention, "W_K")), nn.Parameter)


def _held_name(attention: Any, name: str) -> str:
    """The parameter a HookedTransformer attention holds ``name`` in: ``_W_K`` / ``_b_K`` where it groups key heads."""
    return f"_{name}" if f"_{name}" in attention._parameters else name


@contextlib.contextmanager
def rewritten_in_place(source: TransformerLensModel) -> Iterator[tuple[Any, Any]]:
    """(model, tokenizer) for the functional test to rewrite where the TransformerLens model lives, in its own
    dtype, in evaluation mode and without gradients; put back exactly afterwards, also when the test fails midway.

    As ``in_memory.rewritten_in_place``: the test writes into copies of the parameters it changes and
    into the key/value projections it rebuilds; every module's parameters, buffers, submodules and
    attributes (modes included), and the fields of every TransformerLens and transformers config the
    modules hold, are noted and put back, so the original tensors come back bit for bit.
    """
    import torch

    from qkspectra.models.in_memory import put_back

    source.check_tokenizer()
    model = source.model
    configs = {id(model.cfg): model.cfg}
    for module in model.modules():
        for name in ("cfg", "config"):
            config = module.__dict__.get(name)
            if config is not None and hasattr(config, "__dict__") and not isinstance(config, (torch.nn.Module, torch.Tensor)):
                configs[id(config)] = config
    with put_back(model, list(configs.values())), torch.no_grad():
        model.eval()
        yield model, source.tokenizer


def check_supported(model: Any) -> None:
    """QkspectraError (one line) for what the TransformerLens reading does not model."""
    cfg, kind = model.cfg, type(model).__name__
    position = cfg.positional_embedding_type
    if position not in SUPPORTED_POSITIONS:
        raise QkspectraError(f"{kind}: positional_embedding_type {position!r} is not supported for TransformerLens "
                             f"models (supported: {', '.join(SUPPORTED_POSITIONS)})")
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise QkspectraError(f"{kind}: attention_dir {cfg.attention_dir!r}; only causal TransformerLens models are supported")
    checks = {
        "attn_scores_soft_cap": lambda v: v is not None and v > 0,
        "use_local_attn": bool,
        "use_qk_norm": bool,
        "rmsnorm_uses_offset": bool,
        "use_NTK_by_parts_rope": bool,
        "original_architecture_uses_alibi": bool,
    }
    for field, refused in checks.items():
        value = getattr(cfg, field, None)
        if value is not None and refused(value):
            raise QkspectraError(f"{kind}: cfg.{field}={value!r} changes the attention logit and is not modelled for "
                                 "TransformerLens models")
    for index, block in enumerate(model.blocks):
        attention = getattr(block, "attn", None)
        if attention is None or not hasattr(attention, "W_Q"):
            raise QkspectraError(f"{kind}: block {index} has no attention with W_Q that qkspectra can read")


def rotary_of(model: Any) -> RotaryEmbedding:
    """The rotary embedding the model applies: its native rotary module's, else its config's."""
    cfg = model.cfg
    native = getattr(getattr(model.blocks[0].attn, "original_component", None), "rotary", None)
    if native is not None and hasattr(native, "apply_rope"):  # TransformerLens's native model: adjacent pairs
        return RotaryEmbedding(rotary_dim=int(native.rotary_dim), base=float(native.effective_base), rope_type="default",
                               interleaved=True)
    return RotaryEmbedding(rotary_dim=int(cfg.rotary_dim or cfg.d_head), base=float(cfg.rotary_base), rope_type="default",
                           interleaved=bool(getattr(cfg, "rotary_adjacent_pairs", False)))


def native_rope(attention: Any):
    """The native attention's own rotary function (q, k) -> (q, k) on (B, H, pos, d_head), or None."""
    native = getattr(getattr(attention, "original_component", None), "rotary", None)
    return getattr(native, "apply_rope", None)
