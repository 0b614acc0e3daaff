"""Write a small decoder-only GGUF file with the ``gguf`` package (tests and the GGUF benchmark).

``write_decoder_gguf`` writes a Llama- or Qwen2-architecture file with random weights of the given
shapes, each tensor in F32, F16 or Q8_0 (``tensor_type(name)`` decides), and the metadata transformers'
GGUF reader needs for the config; no tokenizer. ``stand_in_vocab`` writes token embeddings of that many
rows while the metadata's ``vocab_size`` says the full size, for a file that has every tensor the
static pass reads at full size without a full embedding table (the whole model cannot be loaded
from it then).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def write_decoder_gguf(path: Path, *, arch: str = "llama", num_layers: int = 2, d_model: int = 64,
                       num_heads: int = 4, num_kv_heads: int = 2, d_ff: int = 128, vocab: int = 64,
                       stand_in_vocab: int | None = None, tensor_type: Callable[[str], str] = lambda name: "F32",
                       seed: int = 0, tied: bool = False) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    d_head = d_model // num_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(num_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(d_head)
    writer.add_vocab_size(vocab)

    def add(name: str, shape: tuple[int, ...], scale: float = 0.2, offset: float = 0.0) -> None:
        values = (offset + scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        kind = tensor_type(name) if len(shape) == 2 else "F32"  # ggml keeps 1-D tensors in F32
        if kind == "F32":
            writer.add_tensor(name, values)
        elif kind == "F16":
            writer.add_tensor(name, values.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", (stand_in_vocab or vocab, d_model))
    add("output_norm.weight", (d_model,), 0.1, 1.0)
    if not tied:
        add("output.weight", (stand_in_vocab or vocab, d_model))
    for i in range(num_layers):
        add(f"blk.{i}.attn_norm.weight", (d_model,), 0.1, 1.0)
        add(f"blk.{i}.attn_q.weight", (num_heads * d_head, d_model))
        add(f"blk.{i}.attn_k.weight", (num_kv_heads * d_head, d_model))
        add(f"blk.{i}.attn_v.weight", (num_kv_heads * d_head, d_model))
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", (num_heads * d_head,))
            add(f"blk.{i}.attn_k.bias", (num_kv_heads * d_head,))
            add(f"blk.{i}.attn_v.bias", (num_kv_heads * d_head,))
        add(f"blk.{i}.attn_output.weight", (d_model, num_heads * d_head))
        add(f"blk.{i}.ffn_norm.weight", (d_model,), 0.1, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (d_ff, d_model))
        add(f"blk.{i}.ffn_up.weight", (d_ff, d_model))
        add(f"blk.{i}.ffn_down.weight", (d_model, d_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
