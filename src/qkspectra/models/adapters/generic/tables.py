"""The names the generic reader recognises: projection and norm children, epsilon attributes, config fields.

Each table is searched in order; the first name a module or config has wins.
"""

from __future__ import annotations

# Children of an attention module: the query and key ``nn.Linear`` maps and their norms.
QUERY_NAMES = ("q_proj", "query", "q", "wq", "query_proj", "q_lin")
KEY_NAMES = ("k_proj", "key", "k", "wk", "key_proj", "k_lin")
QUERY_NORM_NAMES = ("q_norm", "query_layernorm", "q_layernorm", "query_norm", "q_ln")
KEY_NORM_NAMES = ("k_norm", "key_layernorm", "k_layernorm", "key_norm", "k_ln")

# Where a norm's epsilon is found: on the norm module itself, else on the config (else 1e-6).
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "variance_eps")
CONFIG_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")

# Config fields listing each layer's kind (GPT-Neo's "global"/"local"), the kinds that see only a window of
# keys, and the fields holding that window (the query itself included) for those kinds.
LAYER_KIND_FIELDS = ("layer_types", "attention_layers")
WINDOWED_LAYER_KINDS = ("sliding_attention", "local")
WINDOW_FIELDS = ("sliding_window", "window_size")

# Attributes of an attention module saying whether it applies the rotary embedding (SmolLM3, Llama 4: 0 or 1
# from the config's ``no_rope_layers``); a module without one applies it.
ROTARY_SWITCHES = ("use_rope",)
# Where a module has none, whether a layer type's layers apply it is learned on the tiny model (EXAONE 4.0 and
# Cohere 2 skip it on their "full_attention" layers inside their forward code).

# Attributes of an attention module saying whether it is windowed: False overrides a ``sliding_window`` the
# module keeps on every layer (EXAONE 4.0's, windowed only where ``is_sliding``).
WINDOW_SWITCHES = ("is_sliding",)

# Config fields that clamp every query, key and value coordinate to [-c, c] after projection (OLMo).
CLIP_FIELDS = ("clip_qkv",)

# Config fields the tiny model shrinks or switches off, by what they hold.
FEED_FORWARD_WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size",
                             "shared_expert_intermediate_size", "ffn_hidden_size")
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
EXPERTS_PER_TOKEN_FIELDS = ("num_experts_per_tok", "moe_top_k")
# Config lists that are not one entry per layer even where their length is the number of layers.
NOT_PER_LAYER_FIELDS = ("architectures", "eos_token_id", "bos_token_id", "pad_token_id")
DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                  "attention_probs_dropout_prob", "hidden_dropout_prob", "dropout")
