"""Which model types qkspectra reads: the hand-written adapters and the generic reader's verified types.

``VERIFIED_GENERIC_TYPES`` lists the model types on which the test suite checks the generic reader
(``tests/test_generic.py`` builds a tiny random checkpoint of each and compares with its own eager
attention); any other type is still tried, and read only if the reader proves itself on it.
``supported_models_markdown()`` renders the list in docs/models.md; ``scripts/update_model_docs.py``
writes it between that page's markers, and a test checks that the page is current.
"""

from __future__ import annotations

# Encoders (no causal mask, no language-model head): their base model is what runs.
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")

# model type -> what its test covers
VERIFIED_GENERIC_TYPES: dict[str, str] = {
    "apertus": "per-head q/k norm, llama3 rope frequencies, its input norm named attention_layernorm",
    "arcee": "Llama layout with another MLP",
    "cohere": "interleaved rotary, LayerNorm without bias, parallel block",
    "cohere2": "interleaved rotary on its sliding-window layers only, none on its global layers (skipped in its "
               "forward code, learned per layer type), LayerNorm without bias, parallel block",
    "exaone4": "per-head q/k norm, post-norm block (nothing to fold); hybrid (sliding_window, layer_types): no rotary "
               "embedding and no window on its global layers (learned per layer type; windows from is_sliding)",
    "gemma": "(1 + w) norm gains",
    "glm": "partial interleaved rotary, q/k biases",
    "gpt_neo": "no logit scale at all (no `scaling` attribute), alternating global and local (windowed) layers, "
               "attention module wrapped in another",
    "gptj": "interleaved rotary on part of each head (rotary_dim, no rope_parameters), parallel block",
    "granite": "no logit scale at all (attention_multiplier 1)",
    "granitemoe": "mixture of experts, logit scale 0.3",
    "helium": "interleaved rotary",
    "hunyuan_v1_dense": "per-head q/k norm after the rotary embedding; its checkpoints' \"dynamic\" rope with a fixed "
                        "NTK alpha (base stretched by alpha^(d/(d-2))), frequencies from its own rotary embedding",
    "mixtral": "mixture of experts, sliding window",
    "olmo": "LayerNorm without parameters, queries and keys clipped (clip_qkv)",
    "olmoe": "q/k norm over the whole projection, mixture of experts",
    "phi": "partial rotary, LayerNorm with bias, q/k biases",
    "qwen2_moe": "mixture of experts with a shared expert, q/k biases",
    "qwen3_moe": "per-head q/k norm, mixture of experts",
    "seed_oss": "q/k biases",
    "smollm3": "Llama layout, no rotary embedding on its no_rope_layers (every fourth layer by default)",
    "stablelm": "partial rotary, q/k biases; qk_layernorm (StableLM 2 12B): one LayerNorm module per head, "
                "read as one q/k norm gain row per head",
    "starcoder2": "sliding window, LayerNorm, q/k biases",
}

# What the generic reader refuses, judged from the config and the attention class (tested).
REFUSED = ("soft-capped logits (gemma2's attn_logit_softcapping)", "ALiBi (bloom, mpt, falcon with alibi)",
           "relative-position terms (t5, deberta)", "learned attention sinks (gpt_oss)",
           "fused query/key projections without a hand-written adapter (codegen, ...)")

MODELS_DOC_START = "<!-- supported-model-types:start (scripts/update_model_docs.py) -->"
MODELS_DOC_END = "<!-- supported-model-types:end -->"


def supported_models_markdown() -> str:
    """The list of supported model types in docs/models.md, from the adapter registry and the verified generic types."""
    from qkspectra.models.adapters import ADAPTERS

    hand_written = ", ".join(f"`{name}`" for name in sorted(ADAPTERS))
    generic = "\n".join(f"  - `{name}`: {what}" for name, what in sorted(VERIFIED_GENERIC_TYPES.items()))
    return "\n".join([
        f"- Hand-written adapters ({len(ADAPTERS)}): {hand_written}.",
        f"- Read by the generic reader, verified in the test suite ({len(VERIFIED_GENERIC_TYPES)}):",
        generic,
        "- Any other type whose attention modules have separate query and key linear maps and a `scaling`"
        " is read if the generic reader reproduces a tiny random model of its class; refused in one line"
        f" otherwise, and always for: {'; '.join(REFUSED)}.",
    ])


def replace_models_section(page: str) -> str:
    """``page`` with the text between its markers replaced by ``supported_models_markdown()``."""
    start, end = page.index(MODELS_DOC_START) + len(MODELS_DOC_START), page.index(MODELS_DOC_END)
    return page[:start] + "\n" + supported_models_markdown() + "\n" + page[end:]
