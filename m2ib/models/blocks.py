"""One open_clip transformer block written out, for what a module call cannot do: record attention
probabilities with their graph (attention baselines), evaluate only the queries that reach the
embedding (the last block needs only the pooled token's row), and run fast under autograd (M2IB's
steps, gradient baselines): nn.MultiheadAttention's autograd path is slow on the CPU (run_block).

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
            and not hasattr(block, "ln_1_kv") and block.attn.batch_first and block.attn._qkv_same_embed_dim)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def run_block(block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              query_index: Optional[torch.Tensor] = None, record: Optional[list] = None) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C), or (B, 1, C) when query_index (B,) selects one query per row.

    Without record and without query_index this is the module call itself when autograd records nothing
    here (nn.MultiheadAttention's fused inference kernel) or when the block or its attention carries hooks
    (e.g. pytorch-grad-cam's, which must see the call). Otherwise a plain block is written out with the
    same operations: under autograd, MultiheadAttention transposes to (N, B, C) and runs its input
    projection as a batched matmul against the weight broadcast over the N positions, ~40% slower on the
    CPU than the one matmul over contiguous rows here (the two agree to float32 rounding).
    attn_mask is open_clip's additive (N, N) float mask or None.
    """
    plain = is_plain_block(block)
    graph = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters()))
    if record is None and query_index is None and (not graph or not plain or _hooked(block) or _hooked(block.attn)):
        return block(x, attn_mask=attn_mask)
    if not plain:
        if record is not None:
            raise UnsupportedError(f"attention recording needs open_clip ResidualAttentionBlock, got {type(block).__name__}")
        out = block(x, attn_mask=attn_mask)
        return out[torch.arange(out.shape[0], device=out.device), query_index][:, None]
    attn = block.attn
    B, N, C = x.shape
    heads = attn.num_heads
    hd = C // heads
    h = block.ln_1(x)
    if query_index is None:
        x_q = x
        # one (B N, C) x (C, 3C) matmul; q, k, v as (B, heads, N, hd) views of its output
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    else:
        rows = torch.arange(B, device=x.device)
        x_q, h_q = x[rows, query_index][:, None], h[rows, query_index][:, None]
        w_q, w_kv = attn.in_proj_weight.split([C, 2 * C])
        b_q, b_kv = attn.in_proj_bias.split([C, 2 * C]) if attn.in_proj_bias is not None else (None, None)
        q = F.linear(h_q, w_q, b_q).view(B, 1, heads, hd).transpose(1, 2)
        k, v = F.linear(h, w_kv, b_kv).view(B, N, 2, heads, hd).permute(2, 0, 3, 1, 4)
    Q = x_q.shape[1]
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
