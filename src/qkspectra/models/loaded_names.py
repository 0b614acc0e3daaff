"""A checkpoint's tensors under the names transformers gives them as it loads them.

transformers renames some checkpoint keys on load: legacy ``LayerNorm.gamma``/``beta`` become
``weight``/``bias``, and the conversion mapping of a model type (``transformers.conversion_mapping``)
renames a legacy layout (EXAONE's ``transformer.h.3.attn.attention.q_proj.weight`` is
``model.layers.3.self_attn.q_proj.weight``) or makes tensors out of others (nomic-bert's fused
``attn.Wqkv`` is chunked into ``self_attn.q_proj``, ``k_proj`` and ``v_proj``). ``as_loaded`` reads a
checkpoint through that same mapping, with transformers' own objects and functions, so that the
adapters find its tensors by the names of the model's modules.

Names are mapped once, when the source is wrapped; a tensor is read only when asked for (a made one:
its checkpoint tensors read and transformers' own operations applied). The checkpoint's own names stay
readable beside the new ones.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import numpy as np

from qkspectra.errors import QkspectraError, first_line
from qkspectra.models.tensors import TensorSource


def load_conversions(config: Any) -> list:
    """The ``WeightRenaming``/``WeightConverter`` list transformers applies when it loads the base model of
    ``config`` (``AutoModel``, as qkspectra loads it): its class's mapping, else its model type's, then the
    legacy renamings of every model (what ``get_model_conversion_mapping`` collects for that model's root)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    class_name = MODEL_MAPPING_NAMES.get(config.model_type)
    own = get_checkpoint_conversion_mapping(class_name) if isinstance(class_name, str) else None
    if own is None:
        own = get_checkpoint_conversion_mapping(config.model_type)
    return [*(own or []), *get_checkpoint_conversion_mapping("legacy")]


def as_loaded(tensors: TensorSource, config: Any) -> TensorSource:
    """``tensors`` also under the names transformers loads them as for ``config``; ``tensors`` itself
    where it renames nothing."""
    loaded = LoadedNames(tensors, config)
    return loaded if loaded.mapped else tensors


class LoadedNames:
    """A ``TensorSource`` over a checkpoint's tensors, each also named as transformers loads it.

    ``renamed``: loaded name -> checkpoint name (a ``WeightRenaming``); ``made``: loaded name -> the
    converter and the checkpoint tensors it is made from (a ``WeightConverter``, grouped as the loader
    groups them: by the name of the converter's first target).
    """

    def __init__(self, tensors: TensorSource, config: Any):
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.tensors = tensors
        self.config = config
        conversions = load_conversions(config)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        converter_of = {pattern: c for c in converters for pattern in c.source_patterns}
        own = tensors.names()
        self.renamed: dict[str, str] = {}
        groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}  # first target -> (converter, [(pattern, key)])
        for key in sorted(own, key=dot_natural_key):  # the loader's order (a converter's list of tensors)
            name, pattern = rename_source_key(key, renamings, converters)
            if pattern is not None:
                groups.setdefault(name, (converter_of[pattern], []))[1].append((pattern, key))
            elif name != key and name not in own:
                self.renamed.setdefault(name, key)
        self.made: dict[str, tuple[str, str, Any, list[tuple[str, str]]]] = {}  # name -> (first, target, ...)
        for first, (converter, sources) in groups.items():
            for target in converter.target_patterns:
                name = first.replace(converter.target_patterns[0], target)
                if name not in own:
                    self.made[name] = (first, target, converter, sources)
        self.mapped = bool(self.renamed or self.made)
        self._names = own | frozenset(self.renamed) | frozenset(self.made)
        self._last_made: tuple[str, dict[str, Any]] | None = None  # one converter's outputs, kept for its next target
        self._meta = None  # the model on the meta device, built for the first made tensor (operations read its shapes)

    def names(self) -> frozenset[str]:
        return self._names

    def get(self, name: str) -> np.ndarray:
        if name in self.made:
            return self._make(name)
        return self.tensors.get(self.renamed.get(name, name))

    def dtype(self, name: str) -> str:
        if name in self.made:
            return self.tensors.dtype(self.made[name][3][0][1])
        return self.tensors.dtype(self.renamed.get(name, name))

    def close(self) -> None:
        """Close the checkpoint's files, where its source can (``SafetensorsSource.close``)."""
        if hasattr(self.tensors, "close"):
            self.tensors.close()
        self._last_made = None

    def _make(self, name: str) -> np.ndarray:
        """The tensor ``name`` as transformers makes it on load: its converter's operations applied, in float64,
        to the checkpoint tensors it is made from, with the model on the meta device for the shapes they ask."""
        import torch
        from transformers.core_model_loading import rename_source_key

        first, target, template, sources = self.made[name]
        operations = ", ".join(type(op).__name__ for op in template.operations)
        try:
            if self._meta is None:
                from qkspectra.models.adapters.generic.layout import meta_model

                model = meta_model(self.config)
                self._meta = (model, model.state_dict())
            model, meta_state = self._meta
            # the loader's name for it in the base model (a task model's prefix added or dropped)
            loaded_first, _ = rename_source_key(first, [], [], model.base_model_prefix, meta_state)
            if self._last_made is None or self._last_made[0] != first:
                converter = deepcopy(template)  # a fresh one per target, as the loader takes
                for pattern, key in sources:
                    converter.add_tensor(loaded_first, key, pattern,
                                         lambda key=key: torch.from_numpy(self.tensors.get(key)))
                self._last_made = (first, converter.convert(loaded_first, model=model, config=self.config))
            made = self._last_made[1]
            tensor = made[loaded_first.replace(template.target_patterns[0], target)]
        except QkspectraError:
            raise
        except Exception as e:  # an operation transformers cannot apply here, or tensors that do not fit the model
            raise QkspectraError(f"cannot make tensor {name!r} from {sources[0][1]!r} as transformers does on load "
                                 f"({operations}): {first_line(e) or type(e).__name__}") from e
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        return tensor.to(torch.float64).numpy()
