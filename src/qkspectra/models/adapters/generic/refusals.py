"""What the generic reader refuses, and why: whatever changes the logit beyond s * q . k.

Soft-capping, ALiBi, relative-position terms, learned attention sinks and cross-attention are judged
from the config's fields, the attention class (its parameters and forward source) and, where the
config has no switch for them (BLOOM's ALiBi), the model's own modeling code.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.registry import supported_model_types

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


def refusal_error(model_type: str, what: str) -> QkspectraError:
    """The one-line error naming the model type, what cannot be read and the hand-written adapters."""
    return QkspectraError(f"model type {model_type!r} cannot be read: {what} (hand-written adapters: "
                          f"{', '.join(supported_model_types())})")


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", "none")


def config_refusal(config: Any) -> str | None:
    """What the config switches on beyond s * q . k, in one line (None if nothing)."""
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


def class_refusal(module: Any) -> str | None:
    """What the attention module adds to the logit (sinks, soft-capping, words in its forward), or None."""
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


def module_refusal(model: Any, config: Any) -> str | None:
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
