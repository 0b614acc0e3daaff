"""A reader for model types without a hand-written adapter, which proves itself before it is used.

Any model whose attention logit is s * q . k, with q and k linear maps of the block's input (biases,
query/key norms and rotary positions allowed), can be read from its modules' own description:
the attention modules transformers records (``_can_record_outputs``) with separate query and key
``nn.Linear`` children (``q_proj``/``k_proj``, ``query``/``key``, ...) and the logit scale the module
applies (its ``scaling``, which already carries ``attention_multiplier``, ``query_pre_attn_scalar``
or the absence of any scale). ``generic_adapter(config)``

1. refuses, from the config and the attention class, whatever changes the logit beyond s * q . k:
   soft-capping, ALiBi, relative-position terms, learned attention sinks, cross-attention;
2. builds the model of the real config on the meta device (no memory) and finds the layout
   (tensor names, head counts, scale, sliding windows per layer);
3. builds a tiny random model of the same config class (two layers of each kind, small widths, the
   same attention options), learns from it which norm feeds the block and how each norm applies
   its gain (w or 1 + w, centred or not), reads it with that recipe and checks that the extracted
   weights, biases, scale, norms and positions reproduce the tiny model's own eager attention
   probabilities to 1e-5 on a random input;
4. only then returns the adapter for the real checkpoint. Any failure is a QkspectraError naming
   the model type and what failed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qkspectra.errors import QkspectraError, first_line
from qkspectra.models.adapters.base import (
    AttentionAdapter,
    AttentionLayer,
    QKNorm,
    heads_from_bias,
    heads_from_linear,
    qk_norm_from_tensors,
    rotary_from_config,
)
from qkspectra.models.tensors import StateDictSource, TensorSource

QUERY_NAMES = ("q_proj", "query", "q", "wq", "query_proj", "q_lin")
KEY_NAMES = ("k_proj", "key", "k", "wk", "key_proj", "k_lin")
QUERY_NORM_NAMES = ("q_norm", "query_layernorm", "q_layernorm", "query_norm", "q_ln")
KEY_NORM_NAMES = ("k_norm", "key_layernorm", "k_layernorm", "key_norm", "k_ln")
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "variance_eps")
TOLERANCE = 1e-5  # on attention probabilities
TINY_SEQ_LEN = 12
TINY_SLIDING_WINDOW = 5
TINY_VOCAB = 128

# Config fields, any value other than None/False/0 refused, and what they add to the logit.
REFUSED_CONFIG_FIELDS = {
    "attn_logit_softcapping": "soft-capping of the attention logits",
    "alibi": "ALiBi position biases",
    "use_alibi": "ALiBi position biases",
    "relative_attention": "relative-position terms",
    "relative_attention_num_buckets": "relative-position terms",
    "use_sinks": "learned attention sinks",
    "add_cross_attention": "cross-attention",
    "is_encoder_decoder": "an encoder-decoder model (cross-attention)",
    "use_logn_attn": "a logit scale growing with the position (logn attention)",
}
# Words in the attention class's forward source that betray an extra logit term.
REFUSED_SOURCE_WORDS = {
    "alibi": "ALiBi position biases",
    "softcap": "soft-capping of the attention logits",
    "position_bias": "relative-position terms",
    "relative_position": "relative-position terms",
    "sinks": "learned attention sinks",
}


def _refusal(model_type: str, what: str) -> QkspectraError:
    from qkspectra.models.adapters import supported_model_types

    return QkspectraError(f"model type {model_type!r} cannot be read: {what} (hand-written adapters: "
                          f"{', '.join(supported_model_types())})")


@dataclass(frozen=True)
class NormRecipe:
    """How a norm module applies its parameters: gain = offset + weight, centred (LayerNorm) or not."""

    name: str  # tensor-name stem, with {} for the layer index
    offset: float
    centred: bool
    has_bias: bool
    eps: float


@dataclass(frozen=True)
class Layout:
    """What the real config's modules say, layer by layer."""

    attention: str  # module name with {} for the layer index, e.g. "layers.{}.self_attn"
    query: str  # child names
    key: str
    query_norm: str | None
    key_norm: str | None
    num_heads: int
    num_kv_heads: int
    d_head: int
    d_model: int
    scales: tuple[float, ...]  # per layer
    windows: tuple[int | None, ...]  # per layer
    layer_types: tuple[str | None, ...]  # per layer
    causal: bool
    query_bias: bool
    key_bias: bool


class GenericAdapter(AttentionAdapter):
    """Reads a model through a ``Layout`` and the norm recipes learned on a tiny model of its class."""

    model_type = "generic"
    heads_tile_d_model = False

    def __init__(self, config: Any, layout: Layout, input_norm: NormRecipe | None,
                 query_norm: NormRecipe | None, key_norm: NormRecipe | None, verified_on: str,
                 interleaved: bool = False):
        self.config = config
        self._prefix = None
        self.model_type = config.model_type
        self.layout, self.input_norm, self.query_norm, self.key_norm = layout, input_norm, query_norm, key_norm
        self.verified_on = verified_on
        self.num_layers = len(layout.scales)
        self.num_heads, self.num_kv_heads = layout.num_heads, layout.num_kv_heads
        self.d_model, self.d_head = layout.d_model, layout.d_head
        self.rotary_by_type = {}
        if _has_rotary(config):
            for kind in set(layout.layer_types):
                self.rotary_by_type[kind] = replace(rotary_from_config(config, self.d_head, kind),
                                                    interleaved=interleaved)
        kinds = list(self.rotary_by_type.values())
        self.rotary = kinds[0] if len(set(kinds)) == 1 else None

    def describe(self) -> str:
        return f"generic, verified on a tiny {self.verified_on}"

    def describe_positions(self) -> str:
        if not self.rotary_by_type:
            return "no rotary embedding (absolute positions, if any, added before layer 0)"
        parts = sorted({f"rotary on {r.rotary_dim} of {self.d_head} head dimensions, base {r.base:g}"
                        for r in self.rotary_by_type.values()})
        return "; ".join(parts)

    def anchor_tensor(self) -> str:
        return f"{self.layout.attention.format(0)}.{self.layout.query}.weight"

    def _norm(self, tensors: TensorSource, recipe: NormRecipe, index: int, width: int):
        """(gain, bias) of a norm over ``width`` coordinates (a per-head norm may hold one row per head)."""
        gain = self.read(tensors, f"{recipe.name.format(index)}.weight", None) + recipe.offset
        if gain.shape[-1] != width:
            raise QkspectraError(f"tensor {recipe.name.format(index)}.weight has shape {gain.shape}, "
                                 f"but the config implies ({width},)")
        bias = self.read(tensors, f"{recipe.name.format(index)}.bias", gain.shape) if recipe.has_bias else None
        return gain, bias

    def read(self, tensors: TensorSource, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
        if shape is not None:
            return super().read(tensors, name, shape)
        return tensors.get(self.prefixed(tensors, name))

    def _qk_norm(self, tensors: TensorSource, recipe: NormRecipe | None, index: int, heads: int) -> QKNorm | None:
        if recipe is None:
            return None
        over = "head" if self._per_head(tensors, recipe) else "projection"
        gain, bias = self._norm(tensors, recipe, index, self.d_head if over == "head" else heads * self.d_head)
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
            scale=layout.scales[index],
            norm_gain=norm_gain,
            norm_bias=norm_bias,
            rotary=self.rotary_by_type.get(layout.layer_types[index]),
            q_norm=self._qk_norm(tensors, self.query_norm, index, H),
            k_norm=self._qk_norm(tensors, self.key_norm, index, H_kv),
            sliding_window=layout.windows[index],
        )


def _has_rotary(config: Any) -> bool:
    params = getattr(config, "rope_parameters", None)
    return bool(params) and getattr(config, "position_embedding_type", "rope") in ("rope", "rotary", None)


# ----------------------------------------------------------------------------
# Refusals judged from the config and the attention class
# ----------------------------------------------------------------------------


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", "none")


def _config_refusal(config: Any) -> str | None:
    values = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    for field, what in REFUSED_CONFIG_FIELDS.items():
        if _truthy(values.get(field, getattr(config, field, None))):
            return f"its config sets {field}={values.get(field, getattr(config, field, None))!r} ({what})"
    for key, value in values.items():  # nested option blocks (e.g. MPT's attn_config)
        if isinstance(value, dict) and _truthy(value.get("alibi")):
            return f"its config sets {key}.alibi=True (ALiBi position biases)"
    position_type = values.get("position_embedding_type")
    if isinstance(position_type, str) and position_type.startswith("relative"):
        return f"its config sets position_embedding_type={position_type!r} (relative-position terms)"
    if values.get("pos_att_type"):
        return f"its config sets pos_att_type={values['pos_att_type']!r} (relative-position terms)"
    return None


def _class_refusal(module: Any) -> str | None:
    names = {name for name, _ in module.named_parameters(recurse=False)}
    if names & {"sinks", "sink"}:
        return f"{type(module).__name__} has learned attention sinks"
    if _truthy(getattr(module, "attn_logit_softcapping", None)):
        return f"{type(module).__name__} soft-caps its logits"
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    code = "\n".join(line.split("#")[0] for line in source.splitlines()).lower()
    for word, what in REFUSED_SOURCE_WORDS.items():
        if word in code:
            return f"{type(module).__name__} adds {what}"
    return None


def _module_refusal(model: Any, config: Any) -> str | None:
    """What the model's own modeling code adds to the logit, where its config has no switch for it (BLOOM's ALiBi)."""
    try:
        source = inspect.getsource(inspect.getmodule(type(model)))
    except (OSError, TypeError):
        return None
    for pattern, what, switches in ((r"def \w*alibi\w*\(", "ALiBi position biases", ("alibi",)),
                                    (r"def \w*relative_position\w*\(", "relative-position terms",
                                     ("relative_attention", "position_embedding_type"))):
        if re.search(pattern, source) and not any(hasattr(config, switch) for switch in switches):
            return f"{type(model).__name__} adds {what}"
    return None


# ----------------------------------------------------------------------------
# Layout from the modules
# ----------------------------------------------------------------------------


def _meta_model(config: Any):
    import torch
    from transformers import AutoModel

    from qkspectra.models.offline import transformers_quiet

    with transformers_quiet(progress=False), torch.device("meta"):
        return AutoModel.from_config(config, attn_implementation="eager")


def _child(module: Any, names: tuple[str, ...]) -> str | None:
    children = dict(module.named_children())
    return next((name for name in names if name in children), None)


def _layout(model: Any) -> Layout | str:
    """The model's attention layout, or a line saying what is not recognised."""
    from torch import nn

    from qkspectra.models.modules import attention_modules

    config = model.config
    try:
        modules = attention_modules(model)
    except QkspectraError as e:
        return str(e)
    num_layers = config.num_hidden_layers
    if len(modules) != num_layers or len({id(m) for m in modules}) != num_layers:
        return f"found {len(modules)} attention modules for {num_layers} layers"
    names = {id(m): name for name, m in model.named_modules()}
    first = modules[0]
    for module in modules:
        refusal = _class_refusal(module)
        if refusal is not None:
            return refusal
    template = _template([names[id(m)] for m in modules])
    if template is None:
        return "its attention modules are not numbered by layer"
    query, key = _child(first, QUERY_NAMES), _child(first, KEY_NAMES)
    if query is None or key is None or not all(isinstance(getattr(first, n), nn.Linear) for n in (query, key)):
        return (f"{type(first).__name__} has no separate query and key linear maps (looked for "
                f"{'/'.join(QUERY_NAMES[:3])}, ...)")
    if not all(isinstance(getattr(m, "scaling", None), (int, float)) for m in modules):
        return f"{type(first).__name__} does not expose its logit scale (a float `scaling` attribute)"
    q, k = getattr(first, query), getattr(first, key)
    num_heads = getattr(first, "num_heads", None) or getattr(config, "num_attention_heads", None)
    d_head = getattr(first, "head_dim", None) or (q.out_features // num_heads if num_heads else None)
    if not isinstance(num_heads, int) or not isinstance(d_head, int) or num_heads * d_head != q.out_features \
            or k.out_features % d_head:
        return f"cannot tell the head shapes of {type(first).__name__} ({q.out_features} query features)"
    # Sliding windows: the module's own, else the config's for "sliding_attention" layers, else (configs
    # without layer types, as Mistral's) the config's for every layer.
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    windows = []
    for index, module in enumerate(modules):
        own = getattr(module, "sliding_window", None)
        sliding = layer_types is None or layer_types[index] == "sliding_attention"
        windows.append(own if isinstance(own, int) else window if sliding and isinstance(window, int) else None)
    layer_types = layer_types or [None] * num_layers
    return Layout(
        attention=template, query=query, key=key,
        query_norm=_child(first, QUERY_NORM_NAMES), key_norm=_child(first, KEY_NORM_NAMES),
        num_heads=num_heads, num_kv_heads=k.out_features // d_head, d_head=d_head, d_model=q.in_features,
        scales=tuple(float(m.scaling) for m in modules), windows=tuple(windows),
        layer_types=tuple(layer_types[:num_layers]), causal=bool(getattr(first, "is_causal", False)),
        query_bias=q.bias is not None, key_bias=k.bias is not None,
    )


def _template(names: list[str]) -> str | None:
    """``["layers.0.attn", "layers.1.attn"]`` -> ``"layers.{}.attn"`` (None if not numbered so)."""
    parts = names[0].split(".")
    for position, part in enumerate(parts):
        if part == "0":
            candidate = ".".join(parts[:position] + ["{}"] + parts[position + 1:])
            if all(name == candidate.format(i) for i, name in enumerate(names)):
                return candidate
    return None


# ----------------------------------------------------------------------------
# The tiny model: norm recipes, and the proof
# ----------------------------------------------------------------------------


def tiny_config(config: Any) -> Any:
    """A config of the same class with two layers of each kind, small widths, the same attention options."""
    values = copy.deepcopy(config.to_dict())
    aliases = getattr(config, "attribute_map", {}) or {}

    def put(name: str, value: Any) -> None:
        key = aliases.get(name, name)
        if key in values and values[key] is not None:
            values[key] = value

    heads = 4
    kv = getattr(config, "num_key_value_heads", None)
    real_heads = getattr(config, "num_attention_heads", heads)
    put("hidden_size", 64)
    put("num_attention_heads", heads)
    put("num_key_value_heads", heads if kv in (None, real_heads) else 1 if kv == 1 else 2)
    put("head_dim", 16)
    for name in ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size", "shared_expert_intermediate_size",
                 "ffn_hidden_size"):
        put(name, 32)
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        put(name, 4)
    for name in ("num_experts_per_tok", "moe_top_k"):
        put(name, 2)
    put("vocab_size", TINY_VOCAB)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(values.get(name), int):
            values[name] = min(values[name], TINY_VOCAB - 1)
    put("sliding_window", TINY_SLIDING_WINDOW)
    layer_types = values.get("layer_types")
    if layer_types:
        values["layer_types"] = list(dict.fromkeys(layer_types)) * 2  # every kind, twice, in order of appearance
        put("num_hidden_layers", len(values["layer_types"]))
    else:
        put("num_hidden_layers", 2)
    for name in ("max_window_layers",):
        put(name, 1)
    for name in ("attention_dropout", "attn_pdrop", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                 "attention_probs_dropout_prob", "hidden_dropout_prob", "dropout"):
        if isinstance(values.get(name), float):
            values[name] = 0.0
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return type(config)(**values)


def _randomise(model: Any) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.2)
            if "norm" in name.lower() and name.endswith("weight"):
                parameter.add_(1.0)


def _eps(module: Any, config: Any) -> float:
    for name in EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps"):
        value = getattr(config, name, None)
        if isinstance(value, float):
            return value
    return 1e-6


def _norm_recipe(module: Any, name: str, config: Any) -> NormRecipe | str:
    """How ``module`` applies its gain, probed on a random input; a line saying why not otherwise."""
    import torch

    weight = getattr(module, "weight", None)
    if weight is None:
        return f"norm {name} has no gain"
    bias = getattr(module, "bias", None)
    eps = _eps(module, config)
    z = torch.randn(3, *weight.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    with torch.no_grad():
        out = module(z.to(weight.dtype)).double()
    w = weight.detach().double()
    b = 0.0 if bias is None else bias.detach().double()
    for centred in (False, True):
        centre = z - z.mean(-1, keepdim=True) if centred else z
        normal = centre * torch.rsqrt(centre.pow(2).mean(-1, keepdim=True) + eps)
        for offset in (0.0, 1.0):
            if torch.allclose(normal * (offset + w) + b, out, rtol=1e-4, atol=1e-5):
                return NormRecipe(name, offset, centred, bias is not None, eps)
    return f"norm {name} ({type(module).__name__}) is neither an RMSNorm nor a LayerNorm of its last dimension"


def _input_norm(model: Any, layout: Layout, attention_inputs: list, outputs: dict) -> str | None:
    """The module name (with {}) whose output is layer 0's attention input, if a norm's."""
    parent = layout.attention.format(0).rsplit(".", 1)[0]
    for name, output in outputs.items():
        if name.startswith(parent + ".") and output.shape == attention_inputs[0].shape and \
                bool((output == attention_inputs[0]).all()):
            relative = name[len(parent) + 1:]
            return layout.attention.rsplit(".", 1)[0] + "." + relative
    return None


def _learn_and_verify(config: Any) -> tuple | str:
    """Build the tiny model, learn from it the norm recipes (input, query, key) and the rotary pairing, and check
    the reproduction: (layout, input norm, query norm, key norm, interleaved), or a line saying what failed."""
    import torch
    from transformers import AutoModel

    from qkspectra.models.offline import transformers_quiet

    try:
        tiny = tiny_config(config)
        with transformers_quiet(progress=False):
            model = AutoModel.from_config(tiny, attn_implementation="eager").eval()
    except Exception as e:  # each config class validates in its own way
        return f"cannot build a tiny {config.model_type} model ({first_line(e)})"
    _randomise(model)
    layout = _layout(model)
    if isinstance(layout, str):
        return layout
    norm_modules = {name: m for name, m in model.named_modules()
                    if "norm" in type(m).__name__.lower() or re.search(r"(^|\.)(ln_\w+|\w*norm\w*)$", name)}
    attention_inputs, outputs, handles = [], {}, []
    first = dict(model.named_modules())[layout.attention.format(0)]
    handles.append(first.register_forward_pre_hook(
        lambda m, args, kwargs: attention_inputs.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True))
    for name, module in norm_modules.items():
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: outputs.setdefault(name, out if torch.is_tensor(out) else None)))
    layer_inputs = []
    for index in range(len(layout.scales)):
        attention = dict(model.named_modules())[layout.attention.format(index)]
        handles.append(attention.register_forward_pre_hook(
            lambda m, args, kwargs: layer_inputs.append(kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True))
    input_ids = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ_LEN), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            attentions = model(input_ids=input_ids, output_attentions=True).attentions
    except Exception as e:
        return f"the tiny {config.model_type} model does not run ({first_line(e)})"
    finally:
        for handle in handles:
            handle.remove()
    outputs = {k: v for k, v in outputs.items() if v is not None}
    if not attentions or len(attentions) != len(layout.scales) or any(a is None for a in attentions):
        return "its model does not return eager attention probabilities"

    recipes = []
    input_norm = _input_norm(model, layout, attention_inputs, outputs)
    for name in (input_norm,
                 None if layout.query_norm is None else f"{layout.attention}.{layout.query_norm}",
                 None if layout.key_norm is None else f"{layout.attention}.{layout.key_norm}"):
        if name is None:
            recipes.append(None)
            continue
        recipe = _norm_recipe(dict(model.named_modules())[name.format(0)], name, tiny)
        if isinstance(recipe, str):
            return recipe
        recipes.append(recipe)
    tensors = StateDictSource(model.state_dict())
    failure = ""
    for interleaved in (False, True):  # the rotary pairing, learned like the norms' conventions
        adapter = GenericAdapter(tiny, layout, *recipes, verified_on=config.model_type, interleaved=interleaved)
        if interleaved and not adapter.rotary_by_type:
            break
        try:
            adapter.check_dimensions()
            failure = _reproduction_failure(adapter, tensors, layer_inputs, attentions, config.model_type)
        except QkspectraError as e:
            return f"reading a tiny {config.model_type} failed ({e})"
        if failure is None:
            return layout, *recipes, interleaved
    return failure


def _reproduction_failure(adapter: GenericAdapter, tensors: TensorSource, layer_inputs: list, attentions: tuple,
                          model_type: str) -> str | None:
    from qkspectra.models.adapters.attention import attention_probabilities

    for index, x in enumerate(layer_inputs):
        layer = adapter.layer(tensors, index)
        ours = attention_probabilities(layer, x.double(), causal=adapter.layout.causal)
        error = float((ours - attentions[index].double()).abs().max())
        if not error <= TOLERANCE:
            return (f"the generic reader does not reproduce a tiny {model_type}'s own attention "
                    f"(layer {index}: largest difference {error:.1e} > {TOLERANCE:g})")
    return None


_VERIFIED: dict[str, tuple] = {}


def generic_adapter(config: Any) -> GenericAdapter:
    """The self-verified generic adapter for ``config``; QkspectraError naming the model type and what failed."""
    model_type = getattr(config, "model_type", None)
    if not hasattr(config, "to_dict"):
        raise _refusal(model_type, "its config is not a transformers config")
    refusal = _config_refusal(config)
    if refusal is not None:
        raise _refusal(model_type, refusal)
    try:
        meta = _meta_model(config)
    except Exception as e:
        raise _refusal(model_type, f"transformers cannot build it ({first_line(e)})") from None
    layout = _layout(meta)
    if isinstance(layout, str):
        raise _refusal(model_type, _module_refusal(meta, config) or layout)
    key = f"{type(config).__module__}.{type(config).__name__}:{tiny_config(config).to_json_string()}"
    if key not in _VERIFIED:
        with _quiet_torch():
            _VERIFIED[key] = _learn_and_verify(config)
    learned = _VERIFIED[key]
    if isinstance(learned, str):
        raise _refusal(model_type, learned)
    tiny_layout, *recipes, interleaved = learned
    if (tiny_layout.query, tiny_layout.key, tiny_layout.query_norm, tiny_layout.key_norm) != \
            (layout.query, layout.key, layout.query_norm, layout.key_norm):
        raise _refusal(model_type, "its tiny model has another module layout than the real one")
    return GenericAdapter(config, layout, *recipes, verified_on=model_type, interleaved=interleaved)


@contextlib.contextmanager
def _quiet_torch():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


__all__ = ["GenericAdapter", "generic_adapter", "tiny_config"]
