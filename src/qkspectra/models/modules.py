"""A loaded model's attention modules: the ones whose output transformers records as ``attentions``."""

from __future__ import annotations

from torch import nn

from qkspectra.errors import QkspectraError


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules whose output transformers records as ``attentions``.

    Usually one per layer; a model that shares its layers (ALBERT) has one module run once per layer.
    A model that records no outputs (Falcon, GPT-Neo) gives the innermost modules whose class is named
    ``...Attention`` (GPT-Neo's ``GPTNeoSelfAttention``, not the ``GPTNeoAttention`` that wraps it), if
    there is exactly one per layer.
    """
    specs = getattr(model, "_can_record_outputs", None) or {}
    specs = specs.get("attentions")
    if specs is None:
        named = [module for module in model.modules() if type(module).__name__.endswith("Attention")]
        ids = {id(module) for module in named}
        modules = [module for module in named  # those holding no other attention module
                   if not any(id(inner) in ids for inner in list(module.modules())[1:])]
        if len(modules) != getattr(model.config, "num_hidden_layers", None):
            raise QkspectraError(f"{type(model).__name__} does not say which modules compute its attention maps")
        return modules
    specs = specs if isinstance(specs, list) else [specs]
    modules = [module for name, module in model.named_modules()
               if any(_matches(spec, name, module) for spec in specs)]
    if not modules:
        raise QkspectraError(f"{type(model).__name__}: found no attention modules")
    return modules


def _matches(spec: object, name: str, module: nn.Module) -> bool:
    """Whether a transformers output-recording spec (a class, a class-name suffix or an OutputRecorder) selects module."""
    if isinstance(spec, type):
        return isinstance(module, spec)
    if isinstance(spec, str):
        return name.endswith(spec)
    if getattr(spec, "index", 1) != 1:
        return False
    target, class_name, layer_name = (getattr(spec, key, None) for key in ("target_class", "class_name", "layer_name"))
    selected = (target is not None and isinstance(module, target)) or (class_name is not None and name.endswith(class_name))
    if selected and layer_name is not None:
        return f".{layer_name.strip('.')}." in f".{name}."
    return selected
