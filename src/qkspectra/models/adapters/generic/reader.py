"""``generic_adapter``: the generic reader's one entry, which refuses, lays out, proves, then reads.

Per config it (1) refuses what changes the logit beyond s * q . k (``refusals``), (2) reads the layout of
the real config's model built on the meta device (``layout``), (3) learns the norm recipes on a tiny
model of the same config class and checks that they reproduce its attention (``proof``), and only then
(4) returns the adapter. Layouts are kept per config content, proofs per tiny config, for the process.
See docs/method/generic_reader.md.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from qkspectra.errors import first_line
from qkspectra.models.adapters.generic.adapter import GenericAdapter
from qkspectra.models.adapters.generic.layout import Layout, meta_model, read_layout
from qkspectra.models.adapters.generic.proof import learn_and_verify, tiny_config
from qkspectra.models.adapters.generic.refusals import config_refusal, module_refusal, refusal_error

_LAYOUTS: dict[str, Layout | str] = {}  # config class and content -> its meta model's layout, or why none
_VERIFIED: dict[str, tuple | str] = {}  # tiny config class and JSON -> what learn_and_verify learned, or why not


def generic_adapter(config: Any) -> GenericAdapter:
    """The self-verified generic adapter for ``config``; QkspectraError naming the model type and what failed."""
    model_type = getattr(config, "model_type", None)
    if not hasattr(config, "to_dict"):
        raise refusal_error(model_type, "its config is not a transformers config")
    refusal = config_refusal(config)
    if refusal is not None:
        raise refusal_error(model_type, refusal)
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        parts = [key for key, value in config.to_dict().items() if key.endswith("_config") and isinstance(value, dict)]
        raise refusal_error(model_type, "its config has no num_hidden_layers" + (
            f" (a model of several parts: {', '.join(parts)}, which qkspectra does not read)" if parts else ""))
    layout = _real_layout(config)
    if isinstance(layout, str):
        raise refusal_error(model_type, layout)
    key = f"{type(config).__module__}.{type(config).__name__}:{tiny_config(config).to_json_string()}"
    if key not in _VERIFIED:
        with _quiet_torch():
            _VERIFIED[key] = learn_and_verify(config)
    learned = _VERIFIED[key]
    if isinstance(learned, str):
        raise refusal_error(model_type, learned)
    tiny_layout, *recipes, order = learned
    if (tiny_layout.query, tiny_layout.key, tiny_layout.query_norm, tiny_layout.key_norm) != \
            (layout.query, layout.key, layout.query_norm, layout.key_norm):
        raise refusal_error(model_type, "its tiny model has another module layout than the real one")
    unproved = missing_kind(layout, tiny_layout)
    if unproved is not None:
        raise refusal_error(model_type, unproved)
    return GenericAdapter(config, layout, *recipes, verified_on=model_type, **order)


def _real_layout(config: Any) -> Layout | str:
    """The layout of the real config's modules (built once per config content), or a line saying why none."""
    key = f"{type(config).__module__}.{type(config).__name__}:{config.to_dict()!r}"
    if key not in _LAYOUTS:
        try:
            meta = meta_model(config)
        except Exception as e:
            _LAYOUTS[key] = f"transformers cannot build it ({first_line(e)})"
        else:
            layout = read_layout(meta)
            _LAYOUTS[key] = (module_refusal(meta, config) or layout) if isinstance(layout, str) else layout
    return _LAYOUTS[key]


ROTARY_WORDS = {True: "with rotary embedding", False: "without rotary embedding",
                None: "rotary embedding as learned for its layer type"}


def missing_kind(layout: Layout, tiny_layout: Layout) -> str | None:
    """A line naming the first real layer of a kind (``Layout.kinds``: layer type, window, rotary) that no layer
    of the tiny model has, so the proof never saw it; None if every kind was proved."""
    proved = set(tiny_layout.kinds())
    for index, (layer_type, windowed, rotary) in enumerate(layout.kinds()):
        if (layer_type, windowed, rotary) not in proved:
            return (f"its layer {index} ({layer_type or 'untyped'}, {'windowed' if windowed else 'not windowed'}, "
                    f"{ROTARY_WORDS[rotary]}) is of a kind its tiny model lacks")
    return None


@contextlib.contextmanager
def _quiet_torch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
