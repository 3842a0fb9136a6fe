"""Where the fast M2IB path's time goes: one attribute() call under torch.profiler, self CPU time grouped by
kind of op, and the matmuls' own GFLOP/s next to a plain 2048^3 fp32 matmul's (the floor the rest is above).

    OMP_NUM_THREADS=1 python scripts/profile_m2ib.py --threads 1            # ViT-B-32, batch 1
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from m2ib.method.attributor import M2IBAttributor
from m2ib.method.bottleneck import M2IBConfig
from m2ib.models.sources import load_adapter
from bench_m2ib import make_inputs, matmul_gflops     # scripts/ is the running script's directory

KINDS = {"matmul": ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul"),
         "attention (fused)": ("_scaled_dot_product_flash_attention_for_cpu",
                               "_scaled_dot_product_flash_attention_for_cpu_backward", "_native_multi_head_attention"),
         "gelu": ("gelu", "gelu_backward"),
         "layernorm": ("native_layer_norm", "native_layer_norm_backward"),
         "noise draws": ("normal_",),
         "copies": ("copy_", "cat", "clone", "contiguous", "_to_copy", "stack", "index", "index_put_"),
         "optimizer (Adam)": ("_foreach_", "Optimizer.step#Adam.step", "Optimizer.zero_grad#Adam.zero_grad"),
         "convolution (patch embedding)": ("mkldnn_convolution", "convolution")}


def kind(name: str) -> str:
    op = name.replace("aten::", "")
    for k, names in KINDS.items():
        if op in names or (k == "optimizer (Adam)" and op.startswith("_foreach_")):
            return k
    return "elementwise and other ops"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    adapter = load_adapter(args.model, pretrained=None)
    layer = min(args.layer, adapter.last_valid_layer("image"), adapter.last_valid_layer("text"))
    attributor = M2IBAttributor(adapter, M2IBConfig.from_kwargs(layer=layer, beta=0.1, steps=10, copies=10, lr=1.0))
    px, tb = make_inputs(adapter, args.batch)
    run = lambda: attributor.attribute(px, tb, list(range(args.batch)))  # noqa: E731
    run()
    wall = min(_timed(run) for _ in range(2))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    times, gemm_flops, ops = defaultdict(float), 0.0, defaultdict(lambda: defaultdict(float))
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key in ("aten::linear", "aten::matmul") or ev.self_cpu_time_total == 0:
            continue
        times[kind(ev.key)] += ev.self_cpu_time_total / 1e6
        ops[kind(ev.key)][ev.key.replace("aten::", "")] += ev.self_cpu_time_total / 1e6
        shapes = ev.input_shapes
        if ev.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            a, b = shapes[:2] if ev.key != "aten::addmm" else shapes[1:3]
            gemm_flops += 2 * math.prod(a) * b[-1] * ev.count
    total = sum(times.values())
    peak = matmul_gflops(torch.device("cpu"))
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} thread(s): {wall:.2f} s per call unprofiled, "
          f"{total:.2f} s of op time profiled")
    for k, s in sorted(times.items(), key=lambda kv: -kv[1]):
        top = sorted(ops[k].items(), key=lambda kv: -kv[1])[:4]
        print(f"  {k:32s} {s:6.3f} s  {s / total:6.1%}   " + ", ".join(f"{op} {t:.3f}" for op, t in top))
    gemm = times["matmul"]
    print(f"matmuls: {gemm_flops / 1e9:.1f} GFLOP at {gemm_flops / gemm / 1e9:.1f} GFLOP/s; plain {2048}^3 matmul "
          f"{peak:.1f} GFLOP/s; at that rate the matmuls alone would take {gemm_flops / peak / 1e9:.2f} s")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
