"""The tiny-model proof: a random model of the same config class that the generic reader must reproduce.

``tiny_config`` keeps the config's class and attention options with two layers of each kind (each
combination of the values of the config's per-layer lists: ``layer_types``, ``no_rope_layers``, ...) and small
widths (a ``rotary_dim`` keeps its fraction of the head, a clip of the queries and keys is set where
the tiny model reaches it); ``learn_and_verify`` builds that model, learns its norm recipes, rotary
pairing, q/k norm order, (where its modules expose none) logit scale and, per layer type whose modules do not
say (no ``use_rope``), whether its layers apply the rotary embedding, and checks that the
extracted weights, biases, scale, norms and positions give the model's own eager attention
probabilities to ``TOLERANCE`` on a random input. The reproduction starts from each block's input before
the norm that feeds its attention, normalised as the learned recipe says and read through the layer with
that norm's gain and bias folded in (``models.adapters.base.fold_norm``, as the spectra read it), so
the norm and its fold are part of what is proven.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

from qkspectra.errors import QkspectraError, first_line
from qkspectra.models.adapters.generic.adapter import GenericAdapter, clip_of
from qkspectra.models.adapters.generic.layout import Layout, read_layout
from qkspectra.models.adapters.generic.norms import norm_recipe, normalised
from qkspectra.models.adapters.generic.tables import (
    CLIP_FIELDS,
    DROPOUT_FIELDS,
    EXPERT_COUNT_FIELDS,
    EXPERTS_PER_TOKEN_FIELDS,
    FEED_FORWARD_WIDTH_FIELDS,
    NOT_PER_LAYER_FIELDS,
    WINDOW_FIELDS,
)
from qkspectra.models.tensors import StateDictSource, TensorSource

TOLERANCE = 1e-5  # on attention probabilities
SCALE_EXPONENTS = (0.5, 0.0)  # s = d_head ** -exponent where the module exposes no scale: 1/sqrt(d_head), or none
TINY_SEQ_LEN = 12
TINY_SLIDING_WINDOW = 5
TINY_VOCAB = 128
TINY_CLIP = 1.0  # about half the tiny model's query/key coordinates (RMS about 1.6) lie beyond it


def tiny_config(config: Any) -> Any:
    """A config of the same class with two layers of each kind, small widths, the same attention options.

    A kind is a combination of the values the config's per-layer lists (``per_layer_fields``) hold for one
    layer; the tiny config has one layer of each, in order of first appearance, twice (a real SmolLM3's
    ``no_rope_layers`` [1, 1, 1, 0, 1, ...] beside ``layer_types`` all "full_attention" gives [1, 0, 1, 0]).
    """
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
    for name in FEED_FORWARD_WIDTH_FIELDS:
        put(name, 32)
    for name in EXPERT_COUNT_FIELDS:
        put(name, 4)
    for name in EXPERTS_PER_TOKEN_FIELDS:
        put(name, 2)
    put("vocab_size", TINY_VOCAB)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(values.get(name), int):
            values[name] = min(values[name], TINY_VOCAB - 1)
    for name in WINDOW_FIELDS:
        put(name, TINY_SLIDING_WINDOW)
    rotary_dim = values.get("rotary_dim")
    if isinstance(rotary_dim, int):  # GPT-J's: the same fraction of the tiny model's 16-coordinate heads
        real_d_head = getattr(config, "head_dim", None) or config.hidden_size // real_heads
        values["rotary_dim"] = max(2, 2 * round(8 * rotary_dim / real_d_head))
    per_layer = per_layer_fields(values, config.num_hidden_layers)
    if per_layer:  # one layer of each combination of the per-layer values, twice, in order of appearance
        combinations = list(dict.fromkeys(zip(*(map(_hashable, values[name]) for name in per_layer))))
        for position, name in enumerate(per_layer):
            by_key = {_hashable(value): value for value in values[name]}
            values[name] = [copy.deepcopy(by_key[combination[position]]) for combination in combinations] * 2
        put("num_hidden_layers", 2 * len(combinations))
        if values.get("attention_types"):  # GPT-Neo's runs of layer kinds, [[kinds, repeats], ...], as listed
            values["attention_types"] = [[values["attention_layers"], 1]]
    else:
        put("num_hidden_layers", 2)
    for name in ("max_window_layers",):
        put(name, 1)
    for name in CLIP_FIELDS:  # a clip the tiny model's queries and keys reach, so the proof sees it bind
        put(name, TINY_CLIP)
    for name in DROPOUT_FIELDS:
        if isinstance(values.get(name), float):
            values[name] = 0.0
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return type(config)(**values)


def per_layer_fields(values: dict, num_layers: int) -> list[str]:
    """The config fields holding one entry per layer (``layer_types``, ``no_rope_layers``, GPT-Neo's
    ``attention_layers``, ...): lists of ``num_layers`` entries, bar ``tables.NOT_PER_LAYER_FIELDS``."""
    return [name for name, value in values.items() if isinstance(value, list) and len(value) == num_layers
            and name not in NOT_PER_LAYER_FIELDS]


def _hashable(value: Any) -> Any:
    """A per-layer entry as a dict key (lists and dicts by their repr)."""
    return repr(value) if isinstance(value, (list, dict, set)) else value


def _randomise(model: Any) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.2)
            if "norm" in name.lower() and name.endswith("weight"):
                parameter.add_(1.0)


def _input_norm(model: Any, layout: Layout, attention_inputs: list, outputs: dict) -> str | None:
    """The module name (with {}) whose output is layer 0's attention input, if a norm's in layer 0's block
    (the attention module may sit deeper, as GPT-Neo's ``h.{}.attn.attention`` beside ``h.{}.ln_1``)."""
    block = layout.attention.split("{}")[0] + "{}"
    parent = block.format(0)
    for name, output in outputs.items():
        if name.startswith(parent + ".") and output.shape == attention_inputs[0].shape and \
                bool((output == attention_inputs[0]).all()):
            relative = name[len(parent) + 1:]
            return block + "." + relative
    return None


def _first_input(inputs: dict, name: str):
    """A forward pre-hook keeping in ``inputs[name]`` the first input the module is called with."""
    def keep(module: Any, args: tuple, kwargs: dict) -> None:
        inputs.setdefault(name, args[0] if args else kwargs.get("hidden_states"))
    return keep


def learn_and_verify(config: Any) -> tuple | str:
    """Build the tiny model, learn from it the norm recipes (input, query, key), the rotary pairing, where the
    q/k norms and the clip sit, (where its modules expose none) the logit scale and the layer types that apply no
    rotary embedding, and check the reproduction: (layout, input norm, query norm, key norm, order:
    ``GenericAdapter``'s interleaved, qk_norm_after_rotary, clip_after_qk_norm, scale_exponent, unrotated_types),
    or a line saying what failed: the first layer not reproduced under the order that reproduced the most layers."""
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
    layout = read_layout(model)
    if isinstance(layout, str):
        return layout
    norm_modules = {name: m for name, m in model.named_modules()
                    if "norm" in type(m).__name__.lower() or re.search(r"(^|\.)(ln_\w+|\w*norm\w*)$", name)}
    attention_inputs, outputs, norm_inputs, handles = [], {}, {}, []
    first = dict(model.named_modules())[layout.attention.format(0)]
    handles.append(first.register_forward_pre_hook(
        lambda m, args, kwargs: attention_inputs.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True))
    for name, module in norm_modules.items():
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: outputs.setdefault(name, out if torch.is_tensor(out) else None)))
        handles.append(module.register_forward_pre_hook(_first_input(norm_inputs, name), with_kwargs=True))
    layer_inputs = []  # per layer: (2, TINY_SEQ_LEN, d_model)
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
        width = layout.d_model if name == input_norm else None  # q/k norms: their weight's shape says
        recipe = norm_recipe(dict(model.named_modules())[name.format(0)], name, tiny, width)
        if isinstance(recipe, str):
            return recipe
        recipes.append(recipe)
    if input_norm is not None:  # per layer: (2, TINY_SEQ_LEN, d_model), the block's input before that norm
        layer_inputs = [norm_inputs.get(input_norm.format(index)) for index in range(len(layout.scales))]
        if not all(torch.is_tensor(x) and x.shape == attention_inputs[0].shape for x in layer_inputs):
            return f"cannot find the input of every layer's norm {input_norm}"
    tensors = StateDictSource(model.state_dict())
    best = (-1, "")  # over the orders tried: (index of the first layer not reproduced, the line naming it)
    # the rotary pairing, the order of clip, q/k norms and rotary, and (where a module exposes no scale) the
    # scale's exponent, learned like the norms' conventions; then, layer by layer, whether each layer type whose
    # modules do not say (no use_rope) applies the rotary embedding
    has_norms, has_clip = recipes[1] is not None or recipes[2] is not None, clip_of(tiny) is not None
    for interleaved, after_rotary, clip_after, scale_exponent in itertools.product(
            (False, True), (False, True) if has_norms else (False,), (False, True) if has_norms and has_clip else (False,),
            SCALE_EXPONENTS if None in layout.scales else SCALE_EXPONENTS[:1]):
        order = {"interleaved": interleaved, "qk_norm_after_rotary": after_rotary, "clip_after_qk_norm": clip_after,
                 "scale_exponent": scale_exponent}
        adapter = GenericAdapter(tiny, layout, *recipes, verified_on=config.model_type, **order)
        if (interleaved or after_rotary) and not adapter.rotary_by_type:
            continue
        try:
            adapter.check_dimensions()
            unrotated, failure = _reproduction_failure(adapter, tensors, layer_inputs, attentions, config.model_type)
        except QkspectraError as e:
            return f"reading a tiny {config.model_type} failed ({e})"
        if failure is None:
            return layout, *recipes, {**order, "unrotated_types": unrotated}
        if failure[0] > best[0]:  # the most plausible order: the one reproducing the most layers before failing
            best = failure
    return best[1]


def _reproduction_failure(adapter: GenericAdapter, tensors: TensorSource, layer_inputs: list, attentions: tuple,
                          model_type: str) -> tuple[tuple, tuple[int, str] | None]:
    """Reproduce the layers in order, learning per layer type whether its layers apply the rotary embedding where
    their modules do not say (``Layout.rotary_layers`` None): rotated if its first such layer is reproduced so,
    else unrotated if it is reproduced without. (the layer types learned unrotated, None), or (..., (index, a line
    naming the first layer whose probabilities differ from the model's by more than TOLERANCE either way)).

    ``adapter``: built with no ``unrotated_types``, so every layer whose module does not say is read rotated.
    layer_inputs: per layer (batch, seq, d_model), the input of the norm ``adapter.input_norm`` (the
    attention's own input where there is none); it is normalised as the recipe says and read through the
    layer with the norm's gain and bias folded in.
    """
    from dataclasses import replace

    from qkspectra.models.adapters.attention import attention_probabilities
    from qkspectra.models.adapters.base import fold_norm

    def difference(layer, x_hat, expected) -> float:  # x_hat: (batch, seq, d_model); expected: (batch, H, seq, seq)
        ours = attention_probabilities(layer, x_hat, causal=adapter.layout.causal)
        return float((ours - expected.double()).abs().max())

    recipe = adapter.input_norm
    rotated: dict = {}  # layer type -> whether its layers (whose modules do not say) apply the rotary embedding
    for index, x in enumerate(layer_inputs):  # x: (batch, seq, d_model); attentions[index]: (batch, H, seq, seq)
        x_hat = x.double() if recipe is None else normalised(x.double(), centred=recipe.centred, eps=recipe.eps)
        layer = fold_norm(adapter.layer(tensors, index))
        layer_type = adapter.layout.layer_types[index]
        learned = adapter.layout.rotary_layers[index] is None and layer.rotary is not None
        if learned and rotated.get(layer_type) is False:
            layer = replace(layer, rotary=None)
        error, without = difference(layer, x_hat, attentions[index]), None
        if learned and layer_type not in rotated:
            if not error <= TOLERANCE:
                without = difference(replace(layer, rotary=None), x_hat, attentions[index])
            rotated[layer_type] = error <= TOLERANCE or not without <= TOLERANCE
            error = error if rotated[layer_type] else without
        if not error <= TOLERANCE:
            tried = "" if without is None else f", {without:.1e} without its rotary embedding"
            return (), (index, f"the generic reader does not reproduce a tiny {model_type}'s own attention "
                               f"(layer {index}: largest difference {error:.1e} > {TOLERANCE:g}{tried})")
    return tuple(layer_type for layer_type, rotary in rotated.items() if not rotary), None
