"""A transformers model already in memory, read where it is and left as it was.

``InMemoryModel`` stands where a bundled name or a path would (``extract``, ``runner``, the
functional test): the static pass reads its ``state_dict()`` (no copy of the model; one layer's
tensors at a time are copied to the CPU and turned into float64), the corpus pass runs the
model where it lives, in its own dtype. Nothing is written to disk and nothing is changed:
``untouched`` switches the attention to SDPA (as a loaded model runs) and every module to
evaluation mode, runs without gradients, and puts back the attention implementation, each
module's mode and each parameter's ``requires_grad``. The functional test rewrites query and key
weights where the model is, then puts everything back exactly (``rewritten_in_place``); options asking
for another device or dtype are refused (``check_placement``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qkspectra.errors import QkspectraError, option
from qkspectra.models.tensors import StateDictSource


@dataclass(frozen=True, eq=False)
class InMemoryModel:
    model: Any  # a transformers PreTrainedModel (any head, dtype and device)
    tokenizer: Any | None  # its tokenizer; needed for the corpus pass
    model_id: str  # what the model calls itself (its name_or_path), else its class name
    description: str  # one line for the metadata

    @property
    def config(self) -> Any:
        return self.model.config

    def adapter(self) -> Any:
        """The architecture adapter of the model's config."""
        from qkspectra.models.adapters import adapter_for

        return adapter_for(self.config)

    def tensors(self) -> StateDictSource:
        """The model's tensors by their checkpoint names, read lazily (the state dict holds no copies)."""
        return StateDictSource(self.model.state_dict())

    def check_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise QkspectraError(f"{self.model_id}: the attention-entropy pass needs the model's tokenizer; pass "
                                 f"tokenizer=..., or {option('static_only')}=True for the spectra alone")


def in_memory_model(model: Any, tokenizer: Any | None) -> InMemoryModel:
    """Wrap a transformers model; QkspectraError if ``model`` is not one (a TransformerLens model: ``transformer_lens``)."""
    config = getattr(model, "config", None)
    if not hasattr(model, "state_dict") or getattr(config, "model_type", None) is None:
        raise QkspectraError(f"model must be a bundled model name, a path, or a transformers model in memory; "
                             f"got {type(model).__name__}")
    parameter = next(model.parameters(), None)
    where = "" if parameter is None else f", {str(parameter.dtype).removeprefix('torch.')} on {parameter.device}"
    name = getattr(config, "_name_or_path", "") or ""
    model_id = name or type(model).__name__
    loaded = f" (loaded from {name})" if name else ""
    return InMemoryModel(model, tokenizer, model_id, f"model in memory: {type(model).__name__}{where}{loaded}")


@contextlib.contextmanager
def untouched(model: Any) -> Iterator[Any]:
    """The model with SDPA attention (as a loaded model runs), every module in evaluation mode and no
    gradients; all put back after."""
    import torch

    implementation = getattr(model.config, "_attn_implementation", None)
    modes = [(module, module.training) for module in model.modules()]
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        if implementation != "sdpa":
            model.set_attn_implementation("sdpa")
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        if implementation is not None and implementation != "sdpa":
            model.set_attn_implementation(implementation)
        for module, training in modes:
            module.training = training
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def rewritten_in_place(source: InMemoryModel) -> Iterator[tuple[Any, Any]]:
    """(model, tokenizer) for the functional test to rewrite where the model lives, in its own dtype;
    everything put back exactly afterwards, also when the test fails midway.

    Encoders are given without their task head (the test compares final hidden states); causal
    language models with it (next-token losses). No copy of the model is made: the test writes into
    copies of the parameters it changes (``reconstruction.writing.ModelParameters``) and into the
    key/value projections it rebuilds with one head per query head; here every module's parameters,
    buffers, submodules and attributes, and the config's fields, are noted (references, no tensors
    copied) and put back after, with the attention implementation, modes and ``requires_grad``
    (``untouched``). The original tensors are never written, so they come back bit for bit.
    """
    from qkspectra.models.supported import ENCODER_MODEL_TYPES

    source.check_tokenizer()
    whole = source.model
    model = whole.base_model if source.config.model_type in ENCODER_MODEL_TYPES else whole
    with put_back(whole, [whole.config]), untouched(whole):
        yield model, source.tokenizer


@contextlib.contextmanager
def put_back(whole: Any, configs: list[Any]) -> Iterator[None]:
    """Every module's parameters, buffers, submodules and attributes, and the fields of ``configs``, noted
    (references, no tensors copied) and put back exactly afterwards, also when the body fails."""
    modules = [(module, dict(module.__dict__), dict(module._parameters), dict(module._buffers), dict(module._modules))
               for module in whole.modules()]
    fields = [(config, dict(config.__dict__)) for config in configs]
    try:
        yield
    finally:
        for module, attributes, parameters, buffers, children in modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for held, noted in ((module._parameters, parameters), (module._buffers, buffers),
                                (module._modules, children)):
                held.clear()
                held.update(noted)
        for config, noted in fields:
            config.__dict__.clear()
            config.__dict__.update(noted)


def check_placement(source: InMemoryModel, device: str, dtype: str | None) -> None:
    """QkspectraError (one line) if ``device`` or ``dtype`` asks for another place or precision than the
    model's own: a model in memory is read and run where it is, in its dtype, never moved or cast."""
    import torch

    from qkspectra.models.device import check_placement_names

    check_placement_names(device, dtype)
    parameter = next((p for p in source.model.parameters() if p.is_floating_point()), None)
    if parameter is None:
        return
    own_dtype = str(parameter.dtype).removeprefix("torch.")
    if device != "auto":
        wanted, own = torch.device(device), parameter.device  # "cuda" is "cuda:0"
        if (wanted.type, wanted.index or 0) != (own.type, own.index or 0):
            raise QkspectraError(f"{option('device')}={device!r}, but the model in memory is on {parameter.device}; "
                                 f"it runs where it is: move it (model.to(...)) or leave {option('device')} unset")
    if dtype is not None and dtype != own_dtype:
        raise QkspectraError(f"{option('dtype')}={dtype!r}, but the model in memory is {own_dtype}; it runs in its "
                             f"own dtype: cast it (model.to(...)) or leave {option('dtype')} unset")
