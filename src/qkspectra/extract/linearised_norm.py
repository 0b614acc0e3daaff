"""How a layer's norms enter its metric: the input norm folded in, q/k norms linearised at typical inputs.

``fold_norm`` (``models.adapters.base``): a norm with gain g (and bias beta) feeding the block becomes part of the factors,
diag(g) W_Q, diag(g) W_K, and of the biases b_Q + beta W_Q, b_K + beta W_K.
``linearise``: with q/k norms the logit is invariant to the scale of W_Q and W_K; at typical inputs
it is the bilinear form of the linearised metric M = s * (W_Q / r_Q) diag(g_Q * g_K) (W_K / r_K)^T,
r the typical RMS before the norm: measured on the corpus (``measure_norm_rms``) or for isotropic
unit-RMS input (``isotropic_layer_rms``). The method in full: see docs/method/spectra.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qkspectra.models.adapters.base import AttentionLayer, QKNorm, fold_norm

RMS_SOURCES = {"corpus": "measured on the corpus", "isotropic": "isotropic unit-RMS input (input norm gain folded)"}


@dataclass(frozen=True, eq=False)
class NormRMS:
    """Typical root-mean-square of what the q/k norms normalise, per layer.

    query: (L, H) per query head (a whole-projection norm repeats its one value over the heads)
    key:   (L, H_kv) per key head
    """

    query: np.ndarray
    key: np.ndarray


def _centred(W: np.ndarray, b: np.ndarray | None, norm: QKNorm) -> tuple[np.ndarray, np.ndarray | None]:
    """W (heads, d_model, d_head), b (heads, d_head) minus their means over the normalised coordinates."""
    if not norm.centred:
        return W, b
    if norm.over == "head":
        return W - W.mean(-1, keepdims=True), None if b is None else b - b.mean(-1, keepdims=True)
    return W - W.mean((0, 2), keepdims=True), None if b is None else b - b.mean()


def isotropic_rms(W: np.ndarray, b: np.ndarray | None, norm: QKNorm) -> np.ndarray:
    """(heads,) RMS of the normalised coordinates for isotropic unit-RMS input; W, b as the norm sees them."""
    W, b = _centred(W, b, norm)
    squares = np.einsum("hde,hde->h", W, W) + (0.0 if b is None else np.einsum("he,he->h", b, b))  # (heads,)
    if norm.over == "head":
        return np.sqrt(squares / W.shape[-1])
    return np.full(W.shape[0], np.sqrt(squares.sum() / (W.shape[0] * W.shape[-1])))


def _linearised(W: np.ndarray, b: np.ndarray | None, norm: QKNorm | None,
                rms: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if norm is None:
        return W, b
    W, b = _centred(W, b, norm)
    factor = norm.gain / rms[:, None]  # (heads, d_head)
    W = W * factor[:, None, :]
    if b is not None:
        b = b * factor
    if norm.bias is not None:
        b = norm.bias if b is None else b + norm.bias
    return W, b


def isotropic_layer_rms(layer: AttentionLayer) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(query (H,), key (H_kv,)) typical RMS before the q/k norms for isotropic unit-RMS input x_hat,
    with the input norm's gain folded whether or not ``layer`` is folded; None for a side without a norm."""
    seen = fold_norm(layer)
    return (None if layer.q_norm is None else isotropic_rms(seen.W_Q, seen.b_Q, layer.q_norm),
            None if layer.k_norm is None else isotropic_rms(seen.W_K, seen.b_K, layer.k_norm))


def linearise(layer: AttentionLayer, rms: tuple[np.ndarray | None, np.ndarray | None] | None = None) -> AttentionLayer:
    """The layer with its q/k norms replaced by their linearisation (a layer without them is returned as is).

    rms: (query (H,), key (H_kv,)) typical RMS before the norms; None: ``isotropic_layer_rms``.
    """
    if not layer.has_qk_norm:
        return layer
    rms = isotropic_layer_rms(layer) if rms is None else rms
    W_Q, b_Q = _linearised(layer.W_Q, layer.b_Q, layer.q_norm, rms[0])
    W_K, b_K = _linearised(layer.W_K, layer.b_K, layer.k_norm, rms[1])
    # the linearised form is bilinear: a clip of the queries and keys before the norms is not part of it
    return replace(layer, W_Q=W_Q, W_K=W_K, b_Q=b_Q, b_K=b_K, q_norm=None, k_norm=None, clip=None)


def delinearise(W: np.ndarray, b: np.ndarray | None, norm: QKNorm | None, rms: np.ndarray,
                original: np.ndarray, original_bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Weights W (heads, d_model, d_head) and bias that the norm turns into the linearised W, b (RMSNorm only).

    A coordinate whose norm gain is 0 adds nothing to the logit, whatever its weight: it keeps the
    ``original`` weight and bias (heads, d_model, d_head), (heads, d_head), so the RMS the norm divides
    by stays the original's there (a gain of exactly 0 occurs in real checkpoints: Gemma 3's 1 + w).
    """
    if norm is None:
        return W, b
    gain = np.broadcast_to(norm.gain, rms.shape + norm.gain.shape[-1:])  # (heads, d_head)
    live = gain != 0
    factor = rms[:, None] / np.where(live, gain, 1.0)  # (heads, d_head)
    W = np.where(live[:, None, :], W * factor[:, None, :], original)
    if b is not None:
        b = np.where(live, b * factor, 0.0 if original_bias is None else original_bias)
    return W, b


def measure_norm_rms(model, windows: list[list[int]], adapter, tensors, *, progress: bool = False) -> NormRMS:
    """RMS of each layer's queries and keys before their norms, over the real tokens of ``windows``.

    Hooks on the model's attention modules read each block's input x; q = x W_Q + b_Q (and k) are
    formed from the adapter's factors (centred for LayerNorm-type norms) in float64, one layer at a time.
    """
    import torch
    from tqdm.auto import tqdm

    from qkspectra.errors import QkspectraError
    from qkspectra.models.modules import attention_modules
    from qkspectra.extract.entropy import forward_inputs, pad_windows

    layers = [adapter.layer(tensors, index) for index in range(adapter.num_layers)]
    query_sq = np.zeros((adapter.num_layers, adapter.num_heads))  # sum over tokens of ||q_h||^2
    key_sq = np.zeros((adapter.num_layers, adapter.num_kv_heads))
    state = {"calls": 0, "mask": None}

    def squares(x: np.ndarray, W: np.ndarray, b: np.ndarray | None, norm: QKNorm | None) -> np.ndarray:
        if norm is None:
            return np.zeros(W.shape[0])
        W, b = _centred(W, b, norm)
        z = np.einsum("nd,hde->nhe", x, W) + (0.0 if b is None else b)  # (tokens, heads, d_head)
        return np.einsum("nhe,nhe->h", z, z)

    def record(module, args, kwargs) -> None:
        index = state["calls"]
        state["calls"] += 1
        if index >= adapter.num_layers:
            raise QkspectraError(f"attention ran more than once per layer ({adapter.num_layers} layers)")
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d_model)
        x = hidden[state["mask"]].double().cpu().numpy()  # (tokens, d_model) real tokens only
        layer = layers[index]
        query_sq[index] += squares(x, layer.W_Q, layer.b_Q, layer.q_norm)
        key_sq[index] += squares(x, layer.W_K, layer.b_K, layer.k_norm)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in attention_modules(model)]
    body = model.base_model
    pad_id = model.config.pad_token_id if isinstance(getattr(model.config, "pad_token_id", None), int) else 0
    num_tokens = 0
    try:
        with torch.inference_mode(), tqdm(total=len(windows), unit="window", desc="query/key RMS",
                                          disable=not progress, leave=False) as bar:
            for start in range(0, len(windows), 8):
                batch = windows[start:start + 8]
                input_ids, attention_mask = pad_windows(batch, pad_id, "right")
                state["calls"], state["mask"] = 0, attention_mask.bool()
                body(**forward_inputs(body, input_ids, attention_mask))
                num_tokens += int(attention_mask.sum())
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()

    def rms(sq: np.ndarray, norms: list[QKNorm | None]) -> np.ndarray:
        d_head = adapter.d_head
        out = np.sqrt(sq / (num_tokens * d_head))  # (L, heads)
        for index, norm in enumerate(norms):
            if norm is not None and norm.over == "projection":
                out[index] = np.sqrt(sq[index].sum() / (num_tokens * d_head * sq.shape[1]))
        return out

    return NormRMS(query=rms(query_sq, [layer.q_norm for layer in layers]),
                   key=rms(key_sq, [layer.k_norm for layer in layers]))
