"""One open_clip transformer block written out, for what a module call cannot do: record attention
probabilities with their graph (attention baselines), evaluate only the queries that reach the
embedding (the last block needs only the pooled token's row), and, inside written_out_under_autograd(),
run fast under autograd (M2IB's steps): nn.MultiheadAttention's autograd path is slow on the CPU.

Any block that is not a plain ResidualAttentionBlock falls back to the module call.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
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


_WRITTEN_OUT = ContextVar("m2ib_written_out_under_autograd", default=False)


@contextlib.contextmanager
def written_out_under_autograd():
    """Within: run_block writes plain blocks out when autograd records them (see run_block). Opt-in, so the
    methods that do not ask for it keep their published numbers (the two forms differ by float32 rounding)."""
    token = _WRITTEN_OUT.set(True)
    try:
        yield
    finally:
        _WRITTEN_OUT.reset(token)


def is_plain_block(block: nn.Module) -> bool:
    return (isinstance(block, ResidualAttentionBlock) and isinstance(block.attn, nn.MultiheadAttention)
            and not hasattr(block, "ln_1_kv") and block.attn.batch_first and block.attn._qkv_same_embed_dim)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def run_block(block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              query_index: Optional[torch.Tensor] = None, record: Optional[list] = None) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C), or (B, 1, C) when query_index (B,) selects one query per row.

    Without record and without query_index this is the module call itself (so forward hooks, e.g.
    pytorch-grad-cam's, see it), except inside written_out_under_autograd() when autograd records the block
    and neither it nor its attention carries hooks: then a plain block is written out with the same
    operations, since under autograd MultiheadAttention transposes to (N, B, C) and runs its input
    projection as a batched matmul against the weight broadcast over the N positions, ~40% slower on the
    CPU than the plain matmuls over contiguous rows here (the two agree to float32 rounding).
    attn_mask is open_clip's additive (N, N) float mask or None.
    """
    plain = is_plain_block(block)
    if record is None and query_index is None and not (
            plain and _WRITTEN_OUT.get() and torch.is_grad_enabled() and not _hooked(block) and not _hooked(block.attn)
            and (x.requires_grad or any(p.requires_grad for p in block.parameters()))):
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
