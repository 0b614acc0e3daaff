"""The model a run works on, opened once: where it comes from, its tensors and its adapter."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkspectra.models.adapters import AttentionAdapter
    from qkspectra.models.in_memory import InMemoryModel
    from qkspectra.models.tensors import TensorSource


class Subject:
    """A bundled name, a model folder or .gguf file, or a model in memory (``InMemoryModel``).

    ``source`` (``model_id``, ``description``, ``config``: a resolved ``ModelSource``, or the
    ``InMemoryModel`` itself) is resolved, and ``adapter`` built, on first use and then kept, so
    that a run hands one ``Subject`` to the extraction and to the functional test.
    """

    def __init__(self, model: str | InMemoryModel, *, progress: bool = True):
        self.model = model
        self.progress = progress  # progress bars while a GGUF file is converted on first use

    @property
    def in_memory(self) -> bool:
        return not isinstance(self.model, str)

    @cached_property
    def source(self) -> Any:
        if self.in_memory:
            return self.model
        from qkspectra.models.source import resolve_model

        return resolve_model(self.model, progress=self.progress)

    @cached_property
    def adapter(self) -> AttentionAdapter:
        if self.in_memory:
            return self.model.adapter()
        from qkspectra.models.adapters import adapter_for

        return adapter_for(self.source.config)

    def tensors(self) -> TensorSource:
        """The model's tensors by checkpoint name (and by the name transformers renames each to on load), read lazily:
        from its safetensors files, or from the model in memory."""
        if self.in_memory:
            return self.model.tensors()
        if self.source.gguf_file is not None:
            from qkspectra.models.gguf_tensors import GGUFTensorSource, read_gguf

            model = read_gguf(self.source.gguf_file)
            if model.streamable:  # tensor by tensor, each dequantised when read
                return GGUFTensorSource(model)
        from qkspectra.models.loaded_names import as_loaded
        from qkspectra.models.tensors import open_tensors

        return as_loaded(open_tensors(self.source.folder), self.source.config)  # named as transformers loads them


def subject_of(model: str | InMemoryModel | Subject, *, progress: bool = True) -> Subject:
    """``model`` as a ``Subject`` (itself if it is one)."""
    return model if isinstance(model, Subject) else Subject(model, progress=progress)
