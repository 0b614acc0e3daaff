"""A layer's queries, keys and attention probabilities, formed exactly as the model forms its logits.

From the block's input x (after its input norm; a layer folded by ``base.fold_norm``
takes the normalised vector) ``queries_and_keys`` applies, in the model's order, the projections and
biases, the clip of each coordinate (``clip_qkv``), the query/key norms and the rotary embedding at the
given positions (norms before or after it, as the layer says) and the logit scale (folded into the
queries), so that ``q @ k.T`` is the pre-softmax logit; ``visible_keys`` is the causal and
sliding-window mask. Everything runs in torch, in the dtype of x (float64 for exact checks); the
layer's arrays may be numpy arrays or torch tensors already on x's device (as
``extract.capture.layer_as_torch`` makes them), and any slice of positions works. This is the one
place queries and keys are formed: the corpus pass (``extract.capture``), the generic reader's proof
and the adapters' reproduction tests all use it.
"""

from __future__ import annotations

import numpy as np
import torch

from qkspectra.models.adapters.base import AttentionLayer, QKNorm, RotaryEmbedding


def inverse_frequencies(rotary: RotaryEmbedding) -> np.ndarray:
    """(rotary_dim // 2,) angle per position of each rotated pair."""
    if rotary.inv_freq is not None:
        return np.asarray(rotary.inv_freq, dtype=np.float64)
    return rotary.base ** (-np.arange(0, rotary.rotary_dim, 2, dtype=np.float64) / rotary.rotary_dim)


def rotate(z: torch.Tensor, rotary: RotaryEmbedding | None, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate_half layout) of z (B, H, T, d_head) at positions (B, T)."""
    if rotary is None:
        return z
    half = rotary.rotary_dim // 2
    inv_freq = torch.from_numpy(inverse_frequencies(rotary))  # (half,) float64
    # float64 on the CPU (MPS has no float64), then to z's device and dtype
    angles = positions.cpu().to(torch.float64)[:, None, :, None] * inv_freq  # (B, 1, T, half)
    cos, sin = angles.cos().to(z), angles.sin().to(z)
    rotated, rest = z[..., :2 * half], z[..., 2 * half:]
    if rotary.interleaved:
        first, second = rotated[..., 0::2], rotated[..., 1::2]  # (B, H, T, half) each
        turned = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-1).flatten(-2)
        return torch.cat([turned, rest], dim=-1)
    first, second = rotated[..., :half], rotated[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


def apply_qk_norm(z: torch.Tensor, norm: QKNorm | None) -> torch.Tensor:
    """The query/key norm applied to z (B, H, T, d_head); z itself without one."""
    if norm is None:
        return z
    dims = (-1,) if norm.over == "head" else (1, -1)  # one head's coordinates, or every head's
    if norm.centred:
        z = z - z.mean(dim=dims, keepdim=True)
    z = z * torch.rsqrt(z.pow(2).mean(dim=dims, keepdim=True) + norm.eps)
    z = z * _like(norm.gain, z)[None, :, None, :]
    if norm.bias is not None:
        z = z + _like(norm.bias, z)[None, :, None, :]
    return z


def _like(array: np.ndarray | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``array`` as a tensor of x's dtype on x's device (no copy if it already is one)."""
    return torch.as_tensor(array).to(x)


def _project(x: torch.Tensor, W: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """x (B, T, d_model) -> (B, H, T, d_head) through per-head factors W (H, d_model, d_head), one matrix product."""
    heads, d_model, d_head = W.shape
    z = x @ _like(W, x).permute(1, 0, 2).reshape(d_model, heads * d_head)  # (B, T, H d_head)
    if b is not None:
        z = z + _like(b, x).reshape(-1)
    return z.unflatten(-1, (heads, d_head)).transpose(1, 2)


def queries_and_keys(layer: AttentionLayer, x: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, H, T, d_head) with the scale folded in, and keys (B, H_kv, T, d_head).

    x: (B, T, d_model) the block's input; positions: (B, T) token positions (rotary models).
    Query head h reads key head h // (H / H_kv): q[b, h, i] . k[b, h // (H / H_kv), j] is the
    model's pre-softmax logit of query i and key j.
    """
    q = _formed(layer, _project(x, layer.W_Q, layer.b_Q), layer.q_norm, positions)
    k = _formed(layer, _project(x, layer.W_K, layer.b_K), layer.k_norm, positions)
    return q * layer.scale, k


def _formed(layer: AttentionLayer, z: torch.Tensor, norm: QKNorm | None, positions: torch.Tensor) -> torch.Tensor:
    """Projected queries or keys z (B, heads, T, d_head) clipped, normalised and rotated in the layer's order:
    clip (before the norm, or after it with ``clip_after_qk_norm``), then norm and rotary (the norm first,
    or the rotary first with ``qk_norm_after_rotary``)."""
    clip = layer.clip is not None
    if clip and not layer.clip_after_qk_norm:
        z = z.clamp(-layer.clip, layer.clip)
    if layer.qk_norm_after_rotary:
        z = rotate(z, layer.rotary, positions)
    z = apply_qk_norm(z, norm)
    if clip and layer.clip_after_qk_norm:
        z = z.clamp(-layer.clip, layer.clip)
    return z if layer.qk_norm_after_rotary else rotate(z, layer.rotary, positions)


def visible_keys(layer: AttentionLayer, query_positions: torch.Tensor, key_positions: torch.Tensor, *,
                 causal: bool) -> torch.Tensor | None:
    """(..., query_pos, key_pos) bool, True where the query sees the key; None: every key.

    query_positions (..., query_pos), key_positions (..., key_pos): positions in the sequence.
    """
    if not causal and layer.sliding_window is None:
        return None
    offset = query_positions[..., :, None] - key_positions[..., None, :]  # (..., query_pos, key_pos)
    seen = offset >= 0 if causal else torch.ones_like(offset, dtype=torch.bool)
    if layer.sliding_window is not None:
        seen = seen & (offset < layer.sliding_window) if causal else seen & (offset.abs() < layer.sliding_window)
    return seen


def attention_probabilities(layer: AttentionLayer, x: torch.Tensor, *, causal: bool,
                            positions: torch.Tensor | None = None) -> torch.Tensor:
    """softmax of the logits over the visible keys: x (B, T, d_model) -> (B, H, T, T).

    positions: (B, T), default 0..T-1 in every row.
    """
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    q, k = queries_and_keys(layer, x, positions)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, d_head)
    logits = q @ k.transpose(-1, -2)  # (B, H, T, T)
    seen = visible_keys(layer, positions, positions, causal=causal)
    if seen is not None:
        logits = logits.masked_fill(~seen[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)
