"""``adapter_for``: the adapter a config gets, hand-written (``registry``) or generic (``generic``)."""

from __future__ import annotations

from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.models.adapters.base import AttentionAdapter
from qkspectra.models.adapters.generic import generic_adapter
from qkspectra.models.adapters.registry import ADAPTERS


def adapter_for(config: Any) -> AttentionAdapter:
    """The adapter for ``config.model_type``; QkspectraError naming it if unsupported or misconfigured.

    Model types without a hand-written adapter are read by the generic reader once it has proved
    itself on a tiny random model of the same config class (``generic``), or refused in one line.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        adapter = generic_adapter(config)
        adapter.check_dimensions()
        return adapter
    try:
        adapter = ADAPTERS[model_type](config)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # e.g. a head count that is a string
        raise QkspectraError(f"{model_type} config: cannot read the attention's shapes ({e})") from None
    adapter.check_dimensions()
    return adapter
