"""The attention layout of a model, read from its own modules (built on the meta device for a real config).

The attention modules are those transformers records (``_can_record_outputs``); each must have separate
query and key ``nn.Linear`` children (``tables.QUERY_NAMES``/``KEY_NAMES``) and usually a float ``scaling``,
the logit scale it applies (which already carries ``attention_multiplier``, ``query_pre_attn_scalar`` or the
absence of any scale); where a module has none (GPT-Neo), the proof learns the scale on the tiny model.
The rotary embedding module (one holding an ``inv_freq`` buffer, or one per layer kind as Gemma 3's
``{kind}_inv_freq``) is recorded by its class, which ``rotary`` builds from the config for its frequencies.
Whether a layer applies it is the module's own ``use_rope`` (``tables.ROTARY_SWITCHES``: SmolLM3 and Llama 4
skip it on every fourth layer); where the module has no such switch (None here), the proof learns it per layer
type on the tiny model (EXAONE 4.0 and Cohere 2 skip it on their global layers inside their forward code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.generic.refusals import class_refusal
from qkspectra.models.adapters.generic.tables import (
    KEY_NAMES,
    KEY_NORM_NAMES,
    LAYER_KIND_FIELDS,
    QUERY_NAMES,
    QUERY_NORM_NAMES,
    ROTARY_SWITCHES,
    WINDOW_FIELDS,
    WINDOW_SWITCHES,
    WINDOWED_LAYER_KINDS,
)


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
    scales: tuple[float | None, ...]  # per layer; None where the module exposes no `scaling` (learned by the proof)
    windows: tuple[int | None, ...]  # per layer
    layer_types: tuple[str | None, ...]  # per layer
    causal: bool
    query_bias: bool
    key_bias: bool
    rotary_class: type | None = None  # the model's rotary embedding module class (None: it has none)
    # per layer: whether its module applies the rotary embedding (its ``use_rope``), None where it does not say
    rotary_layers: tuple[bool | None, ...] = ()

    def kinds(self) -> tuple[tuple, ...]:
        """Per layer, what makes it a kind of its own: (layer type, windowed, rotary: True, False or None where
        the module does not say, learned per layer type by the proof)."""
        return tuple(zip(self.layer_types, (w is not None for w in self.windows), self.rotary_layers))


def meta_model(config: Any):
    """The model of ``config`` on the meta device (no memory), with eager attention."""
    import torch
    from transformers import AutoModel

    from qkspectra.models.offline import transformers_quiet

    with transformers_quiet(progress=False), torch.device("meta"):
        return AutoModel.from_config(config, attn_implementation="eager")


def child_named(module: Any, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that is a child of ``module``."""
    children = dict(module.named_children())
    return next((name for name in names if name in children), None)


def read_layout(model: Any) -> Layout | str:
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
        refusal = class_refusal(module)
        if refusal is not None:
            return refusal
    template = layer_template([names[id(m)] for m in modules])
    if template is None:
        return "its attention modules are not numbered by layer"
    query, key = child_named(first, QUERY_NAMES), child_named(first, KEY_NAMES)
    if query is None or key is None or not all(isinstance(getattr(first, n), nn.Linear) for n in (query, key)):
        return (f"{type(first).__name__} has no separate query and key linear maps (looked for "
                f"{'/'.join(QUERY_NAMES[:3])}, ...)")
    q, k = getattr(first, query), getattr(first, key)
    num_heads = getattr(first, "num_heads", None) or getattr(config, "num_attention_heads", None)
    d_head = getattr(first, "head_dim", None) or (q.out_features // num_heads if num_heads else None)
    if not isinstance(num_heads, int) or not isinstance(d_head, int) or num_heads * d_head != q.out_features \
            or k.out_features % d_head:
        return f"cannot tell the head shapes of {type(first).__name__} ({q.out_features} query features)"
    # Sliding windows: the module's own (unless its switch, EXAONE 4.0's ``is_sliding``, is False), else the config's for "sliding_attention" (GPT-Neo: "local") layers,
    # else (configs without layer kinds, as Mistral's) the config's for every layer.
    layer_types = next((getattr(config, f) for f in LAYER_KIND_FIELDS if getattr(config, f, None)), None)
    window = next((getattr(config, f) for f in WINDOW_FIELDS if isinstance(getattr(config, f, None), int)), None)
    windows = []
    for index, module in enumerate(modules):
        own = getattr(module, "sliding_window", None)
        if any(getattr(module, name, None) is False for name in WINDOW_SWITCHES):
            windows.append(None)
            continue
        sliding = layer_types is None or layer_types[index] in WINDOWED_LAYER_KINDS
        windows.append(own if isinstance(own, int) else window if sliding and isinstance(window, int) else None)
    layer_types = layer_types or [None] * num_layers
    rotary_classes = {type(m) for m in model.modules()
                      if any(n == "inv_freq" or n.endswith("_inv_freq") for n, _ in m.named_buffers(recurse=False))}
    if len(rotary_classes) > 1:
        return f"it has rotary embeddings of several classes ({', '.join(sorted(c.__name__ for c in rotary_classes))})"
    return Layout(
        attention=template, query=query, key=key,
        query_norm=child_named(first, QUERY_NORM_NAMES), key_norm=child_named(first, KEY_NORM_NAMES),
        num_heads=num_heads, num_kv_heads=k.out_features // d_head, d_head=d_head, d_model=q.in_features,
        scales=tuple(float(m.scaling) if isinstance(getattr(m, "scaling", None), (int, float)) else None
                     for m in modules), windows=tuple(windows),
        layer_types=tuple(layer_types[:num_layers]), causal=bool(getattr(first, "is_causal", False)),
        query_bias=q.bias is not None, key_bias=k.bias is not None,
        rotary_class=next(iter(rotary_classes), None),
        rotary_layers=tuple(rotary_switch(m) for m in modules),
    )


def rotary_switch(module: Any) -> bool | None:
    """Whether the attention ``module`` applies the rotary embedding: its own switch (SmolLM3's ``use_rope``,
    0 or 1 from the config's ``no_rope_layers``), else None (not said: the proof learns it per layer type)."""
    switch = next((getattr(module, name) for name in ROTARY_SWITCHES if hasattr(module, name)), None)
    return bool(switch) if isinstance(switch, (bool, int)) else None


def layer_template(names: list[str]) -> str | None:
    """``["layers.0.attn", "layers.1.attn"]`` -> ``"layers.{}.attn"`` (None if not numbered so)."""
    parts = names[0].split(".")
    for position, part in enumerate(parts):
        if part == "0":
            candidate = ".".join(parts[:position] + ["{}"] + parts[position + 1:])
            if all(name == candidate.format(i) for i, name in enumerate(names)):
                return candidate
    return None
