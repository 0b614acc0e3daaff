"""Load a resolved model into torch (eval mode, on a chosen device and dtype) with its tokenizer, offline."""

from __future__ import annotations

from qkspectra.errors import QkspectraError, first_line, option
from qkspectra.models.device import Placement
from qkspectra.models.offline import TOKENIZER_FILES, transformers_quiet
from qkspectra.models.source import ModelSource, resolve_model


def load_model(source: ModelSource | str, *, attn_implementation: str = "eager", progress: bool = True,
               placement: Placement = Placement("cpu", "float32"), model_class: str = "AutoModel"):
    """Return ``(model, tokenizer)``: the base transformer (no task head) in eval mode.

    ``source`` is a ``ModelSource`` or anything ``resolve_model`` accepts. With the default
    ``attn_implementation="eager"``, ``output_attentions=True`` returns attention maps.
    The weights are read straight into ``placement``'s dtype and device (safetensors memory-mapped,
    no float32 copy on the way): one copy of the model in memory.
    ``model_class``: the transformers auto class (``AutoModelForCausalLM`` for a language-model head).
    """
    import transformers

    from qkspectra.models.device import torch_dtype

    if isinstance(source, str):
        source = resolve_model(source, progress=progress)
    folder = source.weights_folder(placement.dtype)  # a GGUF: dequantised into the run's dtype, once
    with transformers_quiet(progress=progress):
        try:
            model = getattr(transformers, model_class).from_pretrained(
                folder, dtype=torch_dtype(placement.dtype), attn_implementation=attn_implementation,
                device_map={"": placement.device}, local_files_only=True,
            )
        except Exception as e:  # damaged files fail in the loaders' own ways (SafetensorError, ...)
            raise QkspectraError(f"cannot load the weights of {folder}: {first_line(e)}") from e
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            # transformers would build a near-empty tokenizer and read every word as unknown
            raise QkspectraError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                                 f"the corpus pass needs one ({option('static_only')} does not)")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise QkspectraError(f"cannot load the tokenizer of {folder}: {first_line(e)}") from e
    model.eval()
    return model, tokenizer
