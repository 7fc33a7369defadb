"""The one seam through which every attention in Loupe runs.

Shape legend: B batch, H query heads, G key/value heads, Tq query rows, Tk key columns,
R chosen rows, S extra key columns, D head dim.

`attend` runs PyTorch SDPA by default and an eager reference when asked (or when the
caller needs the softmax probabilities, which SDPA does not return). Both take the same
boolean mask (True = may attend) and give the same output; tests hold them to it.

`row_attention` is the score-rows seam: the attention of a FEW chosen query rows,
computed explicitly so their probabilities can be read (FlexAttention's selection,
FastV's and PyramidDrop's ranking), optionally over extra key columns that only those
rows see (FlexAttention's high-resolution keys). The bulk of the rows stays on SDPA.
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
        gqa = k.shape[1] != q.shape[1]
        if gqa and expand_kv_for_sdpa(q.device, mask is not None):
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
            gqa = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)
        return out, None
    return eager_attention(q, k, v, mask, causal=causal)


def expand_kv_for_sdpa(device: torch.device, masked: bool) -> bool:
    """Whether grouped-query keys/values should be expanded to every head before SDPA.

    On CUDA, SDPA given `enable_gqa=True` and a mask has no fused kernel: flash takes no
    mask, and memory-efficient attention takes no unequal head counts, so it falls back to
    the math kernel and builds the (B, H, Tq, Tk) scores. Expanding K/V (a copy of
    O(H Tk D), small next to the attention) lets memory-efficient attention take the mask.
    Unmasked calls keep `enable_gqa` on the flash kernel. On CPU the flash kernel takes both
    the mask and GQA (checked: `benchmarks/sdpa_kernels.py`), so nothing is expanded."""
    return masked and device.type == "cuda"


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


def row_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    key_mask: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    probs_without_extra: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Explicit attention of a few rows, with float32 softmax.

    Args:
        q: (B, H, R, D) the chosen rows' queries (already rotated).
        k, v: (B, G, Tk, D) the keys and values they may see; v None: probabilities only.
        key_mask: (B, R, Tk) bool, True where a row may attend.
        extra: keys (B, G, S, D), values (B, G, S, D) and mask (B, R, S) of extra columns
            only these rows see. The two key sets are never concatenated, only their scores.
        probs_without_extra: return the rows' probabilities over `k` alone, as if the extra
            columns were absent (FlexAttention's official selection source), from the same scores.

    Returns:
        out (B, H, R, D) (None when v is None) and the probabilities; scores and softmax in float32: (B, H, R, Tk)
        without extra columns (or with `probs_without_extra`), else (B, H, R, Tk + S).
    """
    # Scores in float32 whatever the model's dtype: the probabilities are read (selection,
    # ranking), and a bf16 dot product over thousands of keys would decide them by rounding.
    scale = 1 / math.sqrt(q.shape[-1])
    scores = _grouped_scores(q.float(), k.float()) * scale  # (B, H, R, Tk)
    scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
    if extra is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return (None if v is None else _grouped_mix(probs.to(q.dtype), v)), probs
    if v is None:
        raise ValueError("row_attention with extra columns needs the values v")
    k_extra, v_extra, extra_mask = extra
    extra_scores = _grouped_scores(q.float(), k_extra.float()) * scale  # (B, H, R, S)
    extra_scores = extra_scores.masked_fill(~extra_mask[:, None], float("-inf"))
    probs = torch.softmax(torch.cat([scores, extra_scores], dim=-1), dim=-1, dtype=torch.float32)
    tk = k.shape[2]
    p = probs.to(q.dtype)
    out = _grouped_mix(p[..., :tk], v) + _grouped_mix(p[..., tk:], v_extra)  # (B, H, R, D)
    return out, torch.softmax(scores, dim=-1, dtype=torch.float32) if probs_without_extra else probs


def _grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, R, D) . k (B, G, K, D) -> (B, H, R, K) without repeating k over the groups."""
    b, h, r, d = q.shape
    g = k.shape[1]
    qg = q.view(b, g, (h // g) * r, d)  # (B, G, H/G*R, D): heads of a group share keys
    return (qg @ k.transpose(-1, -2)).view(b, h, r, -1)


def _grouped_mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H, R, K) . v (B, G, K, D) -> (B, H, R, D)."""
    b, h, r, kk = p.shape
    g = v.shape[1]
    return (p.reshape(b, g, (h // g) * r, kk) @ v).view(b, h, r, -1)


def row_key_mask(rows: torch.Tensor, key_valid: torch.Tensor, new_rows: int) -> torch.Tensor:
    """(B, R, Tk): the keys each chosen row sees in the ordinary causal, padded attention.

    rows: (B, R) index of each chosen row among the `new_rows` newest positions;
    key_valid: (B, Tk) False at padding, over cached + new positions.
    """
    tk = key_valid.shape[1]
    own = rows + (tk - new_rows)  # (B, R) key index of each row
    k_pos = torch.arange(tk, device=rows.device)
    return (k_pos[None, None] <= own[..., None]) & key_valid[:, None, :]
