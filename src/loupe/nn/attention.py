"""The one seam through which every attention in Loupe runs.

Shape legend: B batch, H query heads, G key/value heads, Tq query rows, Tk key columns,
D head dim.

`attend` runs PyTorch SDPA by default and an eager reference when asked (or when the
caller needs the softmax probabilities, which SDPA does not return). Both take the same
boolean mask (True = may attend) and give the same output; tests hold them to it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Kernel = Literal["sdpa", "eager"]
KERNELS: tuple[Kernel, ...] = ("sdpa", "eager")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    kernel: Kernel = "sdpa",
    need_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: (B, H, Tq, D) queries.
        k, v: (B, G, Tk, D) keys and values; H must be a multiple of G.
        mask: (B or 1, 1, Tq, Tk) bool, True where a query may attend. Rows must not be
            fully masked (callers let such rows see themselves) or the output is NaN.
        causal: plain causal mask with Tq == Tk (used instead of `mask` on the fast path).
        kernel: "sdpa" (default, fused) or "eager" (reference, returns probabilities).
        need_probs: return the (B, H, Tq, Tk) softmax probabilities; forces eager.

    Returns:
        out (B, H, Tq, D) and the probabilities or None.
    """
    if kernel == "sdpa" and not need_probs:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out, None
    return eager_attention(q, k, v, mask, causal=causal)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: explicit scores, float32 softmax, probabilities returned."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if causal and mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, Tq, Tk)
    return probs @ v, probs


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, Tq, Tk) bool: the last Tq of Tk positions, each seeing itself and the past."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def padded_causal_mask(key_valid: torch.Tensor, tq: int) -> torch.Tensor:
    """Causal mask for the last `tq` of the keys, with padded keys hidden.

    Args:
        key_valid: (B, Tk) bool, False at padding.
        tq: number of query rows (the last tq key positions).

    Returns:
        (B, 1, Tq, Tk) bool. A padding query row sees itself, so no row is empty and no
        NaN can come out of it; its output is never read.
    """
    tk = key_valid.shape[1]
    mask = causal_mask(tq, tk, key_valid.device) & key_valid[:, None, None, :]  # (B, 1, Tq, Tk)
    own = torch.arange(tq, device=key_valid.device) + (tk - tq)  # (Tq,) key index of each row
    diagonal = F.one_hot(own, tk).bool()[None, None]  # (1, 1, Tq, Tk)
    return mask | diagonal


def decoder_mask(key_valid: torch.Tensor, tq: int) -> tuple[torch.Tensor | None, bool]:
    """The (mask, causal) pair for `tq` new rows over keys `key_valid` (B, Tk).

    Without padding the fused kernels run maskless: causal when the rows are the whole
    sequence, no mask at all for a single new row (it may see every key). Note that
    SDPA's `is_causal` aligns top-left, so it is never used when Tq != Tk.
    """
    tk = key_valid.shape[1]
    if bool(key_valid.all()):
        if tq == tk:
            return None, True
        if tq == 1:
            return None, False
    return padded_causal_mask(key_valid, tq), False
