"""One open_clip transformer block written out, for the two things a module call cannot do:
record attention probabilities with their graph (attention baselines) and evaluate only the
queries that reach the embedding (the last block needs only the pooled token's row).

Any block that is not a plain ResidualAttentionBlock falls back to the module call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from m2ib.core.errors import UnsupportedError
from m2ib.models.base import add_attention_parts

try:  # open_clip >= 3
    from open_clip.transformer import ResidualAttentionBlock
except ImportError:  # pragma: no cover
    ResidualAttentionBlock = ()


def is_plain_block(block: nn.Module) -> bool:
    return (isinstance(block, ResidualAttentionBlock) and isinstance(block.attn, nn.MultiheadAttention)
            and not hasattr(block, "ln_1_kv") and block.attn.batch_first)


def run_block(block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              query_index: Optional[torch.Tensor] = None, record: Optional[list] = None) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C), or (B, 1, C) when query_index (B,) selects one query per row.

    Without record and without query_index this is the module call itself (so forward hooks, e.g.
    pytorch-grad-cam's, see it). attn_mask is open_clip's additive (N, N) float mask or None.
    """
    if record is None and query_index is None:
        return block(x, attn_mask=attn_mask)
    if not is_plain_block(block):
        if record is not None:
            raise UnsupportedError(f"attention recording needs open_clip ResidualAttentionBlock, got {type(block).__name__}")
        out = block(x, attn_mask=attn_mask)
        return out[torch.arange(out.shape[0], device=out.device), query_index][:, None]
    attn = block.attn
    B, N, C = x.shape
    heads = attn.num_heads
    hd = C // heads
    h = block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    rows = torch.arange(B, device=x.device)
    if query_index is not None:
        x_q, h_q = x[rows, query_index][:, None], h[rows, query_index][:, None]
    else:
        x_q, h_q = x, h
    Q = x_q.shape[1]
    q = F.linear(h_q, w_q, b_q).view(B, Q, heads, hd).transpose(1, 2)
    k = F.linear(h, w_k, b_k).view(B, N, heads, hd).transpose(1, 2)
    v = F.linear(h, w_v, b_v).view(B, N, heads, hd).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.to(q.dtype)
        mask = mask[query_index][:, None, None, :] if query_index is not None else mask
    if record is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        scores = (q @ k.transpose(-2, -1)) * hd ** -0.5
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        record.append(probs)
        out = probs @ v
    heads_out = out
    out = attn.out_proj(out.transpose(1, 2).reshape(B, Q, C))
    y = x_q + block.ls_1(out)
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    add_attention_parts(record, q=q, k=k, v=v, out=heads_out, hidden=y)
    return y
