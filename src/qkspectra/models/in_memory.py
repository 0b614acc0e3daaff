"""A transformers model already in memory, read where it is and left as it was.

``InMemoryModel`` stands where a bundled name or a path would (``extract``, ``runner``, the
functional test): the static pass reads its ``state_dict()`` (no copy of the model; one layer's
tensors at a time are copied to the CPU and turned into float64), the corpus pass runs the
model where it lives, in its own dtype. Nothing is written to disk and nothing is changed:
``untouched`` switches the attention to SDPA (as a loaded model runs) and every module to
evaluation mode, runs without gradients, and puts back the attention implementation, each
module's mode and each parameter's ``requires_grad``. The functional test rewrites query and key
weights, so it works on a copy (``functional_copy``), never on the caller's model.
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

    def tensors(self) -> StateDictSource:
        """The model's tensors by their checkpoint names, read lazily (the state dict holds no copies)."""
        return StateDictSource(self.model.state_dict())

    def check_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise QkspectraError(f"{self.model_id}: the attention-entropy pass needs the model's tokenizer; pass "
                                 f"tokenizer=..., or {option('static_only')}=True for the spectra alone")


def in_memory_model(model: Any, tokenizer: Any | None) -> InMemoryModel:
    """Wrap a transformers model; QkspectraError if ``model`` is not one."""
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


def functional_copy(source: InMemoryModel) -> tuple[Any, Any]:
    """(model, tokenizer) for the functional test: a copy the test may rewrite, on the CPU.

    Encoders are copied without a task head (the test compares their final hidden states);
    causal language models with their head (it compares next-token losses).
    """
    import copy

    import torch

    from qkspectra.models.supported import ENCODER_MODEL_TYPES

    source.check_tokenizer()
    model = source.model.base_model if source.config.model_type in ENCODER_MODEL_TYPES else source.model
    # Tensors are copied straight to the CPU (the functional test's device): a model on an
    # accelerator is never held twice there.
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    memo.update({id(b): b.detach().to("cpu", copy=True) for b in model.buffers()})
    return copy.deepcopy(model, memo), source.tokenizer
