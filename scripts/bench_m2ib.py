"""Benchmark: pairs/s of the fast M2IB path against the release's cost, measured in the same run.

Random weights (cost does not depend on weights), both modalities, paper hyperparameters
(layer 9/9, beta 0.1, 10 steps x 10 copies, lr 1).

- Release-cost baseline: m2ib.method.reference, the released algorithm at the released cost (both full
  encoders re-run through open_clip's own forward at every step, weights trainable with their gradients
  computed and thrown away, text unpadded, one pair at a time). Speed-ups are against it.
- FLOPs: torch's FlopCounterMode plus formulas for the fused attention kernels it has none for on the CPU
  (scaled_dot_product_attention's CPU flash kernel, forward and backward, and nn.MultiheadAttention's
  fused inference path), so attention counts; the counted ops are printed.
- Rate: the fast path's GFLOP/s as a fraction of a plain 2048^3 fp32 matmul on the same device and threads,
  at every batch size (batch 1: one pair, as in an interactive call) and at the best one.

    python scripts/bench_m2ib.py --threads 1 --repeats 3          # ViT-B-32 on the CPU, one thread
    python scripts/bench_m2ib.py --threads 1 --cpu-bf16             # also M2IB's amp=True (bf16 steps) on the CPU
    python scripts/bench_m2ib.py --device cuda --batches 1 16 64 256 --amp

The header line shows any glibc MALLOC_* settings in the environment (keeping freed activations with
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ was measured back to back on the 2-core
machine: no difference above its ~10% run-to-run noise).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from m2ib.method.bottleneck import M2IBConfig
from m2ib.method.attributor import M2IBAttributor
from m2ib.models.sources import load_adapter
from m2ib.method.reference import reference_pair

CAPTIONS = ["a photo of a dog playing with a red ball on the grass",
            "two people riding bicycles along a river at sunset",
            "a bowl of soup next to a loaf of bread on a wooden table",
            "an old church tower behind green trees under a cloudy sky"]
MATMUL_N = 2048
aten = torch.ops.aten


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(adapter, n, seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((256, 320, 3)) * 255).astype("uint8")) for _ in range(n)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return adapter.preprocess(images), adapter.tokenize(captions)


def matmul_gflops(device, n=MATMUL_N, reps=10):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def sdpa_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def native_mha_flop(query_shape, key_shape, value_shape, embed_dim, num_heads, *args, **kwargs) -> int:
    """nn.MultiheadAttention's fused inference kernel: in-projection, attention, out-projection."""
    b, n, e = query_shape
    s = key_shape[1]
    heads_shape = (b, num_heads, n, e // num_heads)
    kv_shape = (b, num_heads, s, e // num_heads)
    return 2 * b * (n + 2 * s) * e * e + sdpa_flop_count(heads_shape, kv_shape, kv_shape) + 2 * b * n * e * e


#: fused attention ops with no FLOP formula in torch.utils.flop_counter (the CPU paths)
ATTENTION_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
                   aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
                   aten._native_multi_head_attention: native_mha_flop}


def counted_flops(fn) -> tuple[float, dict]:
    """Run fn once under the FLOP counter (with ATTENTION_FLOPS): total FLOPs and {op name: FLOPs}."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        fn()
    per_op = {str(op).replace("aten.", ""): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def time_best(fn, repeats: int, device) -> float:
    """Seconds of the fastest of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def print_bf16(run, run_amp, fp32_rate: float, release_rate: float, repeats: int, device) -> None:
    """Time M2IB with amp=True (bf16 autocast of the steps) on the CPU; its image/text capacities against
    fp32's (Pearson r, worst pair)."""
    fp32, bf16 = run(), run_amp()
    rate = len(bf16.image) / time_best(run_amp, repeats, device)
    corr = {m: min(float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in
                   zip(fp32.meta[f"{m}_capacity"], bf16.meta[f"{m}_capacity"])) for m in ("image", "text")}
    print(f"  with amp=True (CPU bf16): {rate:8.3f} pairs/s = {rate / fp32_rate:.2f}x fp32, "
          f"{rate / release_rate:.1f}x the release cost; capacities' Pearson r to fp32 >= {corr['image']:.5f} (image), {corr['text']:.5f} (text)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--reference-pairs", type=int, default=1, help="pairs timed for the release-cost baseline")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per batch size (best is kept)")
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--amp", action="store_true", help="M2IB's amp=True (bf16 autocast of the steps) for every batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="on the CPU, also time each batch with M2IB's amp=True (bf16 autocast of the steps; numerics "
                        "differ: compared to fp32's capacities)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    adapter = load_adapter(args.model, pretrained=None, device=str(device))
    layer = min(args.layer, adapter.last_valid_layer("image"), adapter.last_valid_layer("text"))
    cfg = M2IBConfig.from_kwargs(layer=layer, beta=0.1, steps=10, copies=10, lr=1.0, amp=args.amp)
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    print(f"model {args.model} (random weights), device {device} ({torch.get_num_threads()} threads), "
          f"layer {layer}, 10 steps x 10 copies, both modalities; {malloc or 'default glibc malloc settings'}")

    px, tb = make_inputs(adapter, args.reference_pairs)

    def release(i, c):
        return reference_pair(adapter.model, px[i:i + 1], tb.ids[i:i + 1], int(tb.eot[i]), c, seed=i)

    # every step of the release does the same work: count one (pair 0), times the steps
    release_flops = counted_flops(lambda: release(0, replace(cfg, image=replace(cfg.image, steps=1),
                                                               text=replace(cfg.text, steps=1))))[0] * cfg.image.steps
    sync(device)
    t = time.perf_counter()
    for i in range(args.reference_pairs):
        release(i, cfg)
    sync(device)
    release_rate = args.reference_pairs / (time.perf_counter() - t)
    peak = matmul_gflops(device)
    print(f"release-cost baseline (release algorithm and cost: full encoders every step, weight grads, "
          f"unpadded text, one pair at a time): {release_rate:8.4f} pairs/s ({1 / release_rate:.1f} s/pair), "
          f"{release_flops / 1e9:.0f} GFLOP/pair, {release_rate * release_flops / 1e9:.1f} GFLOP/s")

    attributor = M2IBAttributor(adapter, cfg)
    attributor_amp = M2IBAttributor(adapter, replace(cfg, amp=True))
    rows = []
    for b in args.batches:
        pxb, tbb = make_inputs(adapter, b)
        run = lambda: attributor.attribute(pxb, tbb, list(range(b)))  # noqa: E731
        flops, per_op = counted_flops(run)        # also the warm-up
        rate = b / time_best(run, args.repeats, device)
        gflops = rate * flops / b / 1e9
        rows.append((b, rate, gflops))
        print(f"fast path, batch {b:4d}: {rate:8.3f} pairs/s   speed-up vs release cost {rate / release_rate:6.1f}x   "
              f"{flops / b / 1e9:6.1f} GFLOP/pair ({release_flops * b / flops:.1f}x fewer), {gflops:6.1f} GFLOP/s")
        if args.cpu_bf16 and device.type == "cpu":
            run_amp = lambda: attributor_amp.attribute(pxb, tbb, list(range(b)))  # noqa: E731
            print_bf16(run, run_amp, rate, release_rate, args.repeats, device)
        if b == args.batches[0]:
            print("  FLOPs counted (GFLOP/pair): " + ", ".join(f"{op} {n / b / 1e9:.2f}" for op, n in
                                                              sorted(per_op.items(), key=lambda kv: -kv[1])))
    peak = max(peak, matmul_gflops(device))   # the better of two measurements, before and after the fast path
    print(f"plain {MATMUL_N}^3 fp32 matmul: {peak:.1f} GFLOP/s; the release-cost baseline runs at "
          f"{release_rate * release_flops / 1e9 / peak:.2f} of it")
    for b, rate, gflops in rows:
        print(f"batch {b:4d}: {rate:.3f} pairs/s = {rate / release_rate:.1f}x the release cost, "
              f"{gflops / peak:.2f} of the matmul rate")
    b, rate, gflops = max(rows, key=lambda r: r[1])
    print(f"best: batch {b}, {rate:.3f} pairs/s = {rate / release_rate:.1f}x the release cost, "
          f"{gflops:.1f} GFLOP/s = {gflops / peak:.2f} of the matmul rate")


if __name__ == "__main__":
    main()
