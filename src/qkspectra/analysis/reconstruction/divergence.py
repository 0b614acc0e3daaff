"""How much a rewritten attention call's distribution moved: per-query KL(original || changed) and entropy.

No attention map is formed: on the CPU both come from torch's fused attention kernel
(``attention_change``), elsewhere from blocks of logits with an online log-sum-exp (``logit_kl``,
through ``extract.streamed_entropy.logit_blocks``). See docs/method/functional_test.md.
"""

from __future__ import annotations

import torch

from qkspectra.extract.capture import AttentionCall, VisibleKeys
from qkspectra.extract.streamed_entropy import (
    FUSED_KERNEL_DEVICES,
    HIDDEN_LOGIT,
    START_LOGIT,
    centred,
    logit_blocks,
    softmax_moments,
)


def logit_kl(reference: tuple[torch.Tensor, torch.Tensor], changed: tuple[torch.Tensor, torch.Tensor],
             visible: VisibleKeys) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p0 || p) and the entropy of p, p0 = softmax(q0 . k0) and p = softmax(q . k), one block of logits at a time.

    reference, changed: (queries (B, H, query_pos, d_head), keys (B, H, key_pos, d_head)) float32, scale included
    returns kl (B, H, query_pos), entropy (B, H, query_pos), float32; 0 for queries that see no key

    Online over key blocks (see ``extract.streamed_entropy``): for p0 the running max m0 and sum l0, and
    a = sum_j exp(s0_j - m0)(s0_j - s_j) (rescaled by exp(-d) when m0 grows by d); for p the
    running m, l, u of the entropy. Then KL = a / l0 - (m0 + log l0) + (m + log l).
    """
    (q0, k0), (q, k) = reference, changed
    B, H, num_queries, _ = q.shape
    num_keys = k.shape[2]
    state = q.new_zeros((6, B, H, num_queries))
    m0, l0, a, m, l, u = state
    m0.fill_(START_LOGIT)
    m.fill_(START_LOGIT)
    for rows, key_blocks in logit_blocks(num_queries, num_keys, visible, 2 * B * H):
        for cols, mask in key_blocks:
            s0 = q0[..., rows, :] @ k0[..., cols, :].transpose(-1, -2)  # (B, H, bq, bk)
            s = q[..., rows, :] @ k[..., cols, :].transpose(-1, -2)
            if mask is not True:
                mask = mask[:, :, 0]  # (B|1, 1, bq, bk)
                s0.masked_fill_(~mask, HIDDEN_LOGIT)
                s.masked_fill_(~mask, HIDDEN_LOGIT)
            m0_new = torch.maximum(m0[..., rows], s0.amax(-1))
            m_new = torch.maximum(m[..., rows], s.amax(-1))
            grown0, grown = m0_new - m0[..., rows], m_new - m[..., rows]
            w0 = torch.exp(s0 - m0_new.unsqueeze(-1))  # exp(s0 - m0)
            a[..., rows] = torch.exp(-grown0) * a[..., rows] + (w0 * (s0 - s)).sum(-1)
            l0[..., rows] = torch.exp(-grown0) * l0[..., rows] + w0.sum(-1)
            s.sub_(m_new.unsqueeze(-1))
            w = torch.exp(s)
            decay = torch.exp(-grown)
            u[..., rows] = decay * (u[..., rows] - grown * l[..., rows]) + s.mul_(w).sum(-1)
            l[..., rows] = decay * l[..., rows] + w.sum(-1)
            m0[..., rows], m[..., rows] = m0_new, m_new
    seen = (l0 > 0) & (l > 0)
    safe_l0, safe_l = torch.where(seen, l0, 1.0), torch.where(seen, l, 1.0)
    kl = torch.where(seen, a / safe_l0 - (m0 + torch.log(safe_l0)) + (m + torch.log(safe_l)), 0.0)
    entropy = torch.where(seen, torch.log(safe_l) - u / safe_l, 0.0)
    return kl, entropy


def attention_change(original: AttentionCall, original_entropy: torch.Tensor,
                     changed: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p0 || p) and the entropy of p (B, H, query_pos) float32, p0 the original call's attention, p the changed one's.

    original_entropy: (B, H, query_pos) the entropy of p0. On the CPU from torch's fused attention
    kernel: with s0, s the two calls' logits, KL = sum_j p0_j (s0_j - s_j) - lse0 + lse
    = -H(p0) - E_p0[s] + lse, E_p0[s] = scale q . (sum_j p0_j k_j) (the original attention with
    the changed keys as values), and lse, H(p) as in ``extract.streamed_entropy.flash_entropy``; elsewhere
    from blocks of logits (``logit_kl``). Both calls' keys are centred (``centred``), the changed
    ones alike as keys and as values, which leaves KL and entropy unchanged. 0 for queries that see no key.
    """
    if changed.queries.device.type not in FUSED_KERNEL_DEVICES:
        return logit_kl((original.scaled_queries(), original.keys_per_query_head()),
                        (changed.scaled_queries(), changed.keys_per_query_head()), changed.visible)
    queries, keys = changed.queries.to(torch.float32), centred(changed.keys_per_query_head())
    _, original_mean_key = softmax_moments(original.queries.to(torch.float32), centred(original.keys_per_query_head()),
                                           keys, original.scale, original.visible)  # (B, H, query_pos, d_head)
    lse, mean_key = softmax_moments(queries, keys, keys, changed.scale, changed.visible)
    entropy = torch.linalg.vecdot(queries, mean_key).mul_(-changed.scale).add_(lse).clamp_(min=0.0)
    kl = (lse - original_entropy).sub_(torch.linalg.vecdot(queries, original_mean_key).mul_(changed.scale))
    seen = (changed.visible.count() > 0).to(kl.device)[:, None, :]  # (B|1, 1, query_pos)
    return torch.where(seen, kl, 0.0), torch.where(seen, entropy, 0.0)
