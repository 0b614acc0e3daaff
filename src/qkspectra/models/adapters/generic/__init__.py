"""The generic reader: model types without a hand-written adapter, read once proved on a tiny model.

Any model whose attention logit is s * q . k, with q and k linear maps of the block's input (biases,
query/key norms and rotary positions allowed), is read from its own modules; anything else is refused
in one line. ``generic_adapter(config)`` (``reader``) is the entry; see docs/method/generic_reader.md.
"""

from qkspectra.models.adapters.generic.adapter import GenericAdapter
from qkspectra.models.adapters.generic.layout import Layout
from qkspectra.models.adapters.generic.norms import NormRecipe
from qkspectra.models.adapters.generic.proof import tiny_config
from qkspectra.models.adapters.generic.reader import generic_adapter

__all__ = ["GenericAdapter", "Layout", "NormRecipe", "generic_adapter", "tiny_config"]
