"""Benchmark: pairs/s of the plain reference vs the fast M2IB path, measured in the same run.

Random weights (cost does not depend on weights), both modalities, paper hyperparameters
(layer 9/9, beta 0.1, 10 steps x 10 copies, lr 1). Prints pairs/s, the speed-up ratio, and the fast
path's achieved GFLOP/s as a fraction of a plain matmul's GFLOP/s on the same device.

    python scripts/bench_m2ib.py                       # ViT-B-32 on the CPU
    python scripts/bench_m2ib.py --device cuda --batches 1 16 64 256 --amp
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from m2ib.method.bottleneck import M2IBConfig
from m2ib.method.attributor import M2IBAttributor
from m2ib.models.sources import load_adapter
from m2ib.method.reference import reference_pair

CAPTIONS = ["a photo of a dog playing with a red ball on the grass",
            "two people riding bicycles along a river at sunset",
            "a bowl of soup next to a loaf of bread on a wooden table",
            "an old church tower behind green trees under a cloudy sky"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(adapter, n, seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((256, 320, 3)) * 255).astype("uint8")) for _ in range(n)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return adapter.preprocess(images), adapter.tokenize(captions)


def matmul_gflops(device, n=2048, reps=10):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--reference-pairs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per batch size (best is kept)")
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    adapter = load_adapter(args.model, pretrained=None, device=str(device))
    layer = min(args.layer, adapter.last_valid_layer("image"), adapter.last_valid_layer("text"))
    cfg = M2IBConfig.from_kwargs(layer=layer, beta=0.1, steps=10, copies=10, lr=1.0, amp=args.amp)
    print(f"model {args.model} (random weights), device {device} ({torch.get_num_threads()} threads), "
          f"layer {layer}, 10 steps x 10 copies, both modalities")

    px, tb = make_inputs(adapter, args.reference_pairs)
    sync(device)
    t = time.perf_counter()
    for i in range(args.reference_pairs):
        reference_pair(adapter.model, px[i:i + 1], tb.ids[i:i + 1], int(tb.eot[i]), cfg, seed=i)
    sync(device)
    ref_rate = args.reference_pairs / (time.perf_counter() - t)
    print(f"reference (release algorithm, one pair at a time): {ref_rate:8.3f} pairs/s")

    attributor = M2IBAttributor(adapter, cfg)
    px1, tb1 = make_inputs(adapter, 1)
    with FlopCounterMode(display=False) as counter:
        attributor.attribute(px1, tb1, [0])
    flops_per_pair = counter.get_total_flops()
    best = (0.0, 0)
    for b in args.batches:
        pxb, tbb = make_inputs(adapter, b)
        attributor.attribute(pxb, tbb, list(range(b)))      # warm-up
        rate = 0.0
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            attributor.attribute(pxb, tbb, list(range(b)))
            sync(device)
            rate = max(rate, b / (time.perf_counter() - t))
        print(f"fast path, batch {b:4d}: {rate:8.3f} pairs/s   speed-up vs reference {rate / ref_rate:6.1f}x")
        best = max(best, (rate, b))
    peak = matmul_gflops(device)
    achieved = best[0] * flops_per_pair / 1e9
    print(f"best: batch {best[1]}, {best[0]:.3f} pairs/s, ratio to reference {best[0] / ref_rate:.1f}x")
    print(f"achieved {achieved:.1f} GFLOP/s ({flops_per_pair / 1e9:.1f} GFLOP/pair) = "
          f"{achieved / peak:.2f} of a plain {2048}^3 fp32 matmul ({peak:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
