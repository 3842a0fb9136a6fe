"""scripts/bench_m2ib.py counts the fused attention kernels torch's FLOP counter has no formula for on the CPU."""
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

spec = importlib.util.spec_from_file_location("bench_m2ib", Path(__file__).parents[1] / "scripts" / "bench_m2ib.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_sdpa_forward_and_backward_counted():
    b, h, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    total, per_op = bench.counted_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    bmm = 2 * b * h * n * n * d        # one (n, d) x (d, n) product per head, or (n, n) x (n, d)
    assert per_op["_scaled_dot_product_flash_attention_for_cpu"] == 2 * bmm         # scores, scores @ v
    assert per_op["_scaled_dot_product_flash_attention_for_cpu_backward"] == 5 * bmm  # recompute + 4 grads
    assert total == 7 * bmm


def test_fused_multihead_attention_counted():
    b, n, e, heads = 2, 5, 8, 2
    mha = torch.nn.MultiheadAttention(e, heads, batch_first=True).eval()
    x = torch.randn(b, n, e)
    with torch.no_grad():
        total, per_op = bench.counted_flops(lambda: mha(x, x, x, need_weights=False))
    projections = 2 * b * n * e * 3 * e + 2 * b * n * e * e
    assert per_op == {"_native_multi_head_attention": projections + 2 * 2 * b * n * n * e}
