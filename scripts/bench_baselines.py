"""Benchmark: CPU (or GPU) seconds per pair of every baseline, and the ratio to M2IB's cost.

Both modalities, one pair per call (what a per-pair evaluation loop pays), default hyperparameters
unless --fast. Runs on the embedded trained model and its test split when they are available, else
on the tiny random test model with generated images (cost does not depend on the weights), and
says which. M2IB (method 'm2ib') is timed in the same run when m2ib.method is importable.

    python scripts/bench_baselines.py                          # all methods, 4 pairs, 1 thread
    python scripts/bench_baselines.py --model tiny --pairs 2 --methods saliency rise
    python scripts/bench_baselines.py --model ViT-B-32         # random-weight ViT-B/32 (cost only)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from m2ib.core.attributor import available_methods, get_method
from m2ib.core.errors import DataUnavailableError, ModelUnavailableError, UnsupportedError

CAPTIONS = ["a photo of a red circle next to a small blue square",
            "two green triangles on a white background",
            "the large yellow diamond",
            "can you spot the purple cross among other shapes"]


def load(model: str, pairs: int, device: str):
    """(adapter, pixels, text, description)."""
    if model == "embedded":
        try:
            from m2ib.data.embedded import load_embedded_split
            from m2ib.models.embedded import load_embedded_adapter
            adapter = load_embedded_adapter(device=device)
            samples = load_embedded_split("test", limit=pairs, progress=False)
            return (adapter, adapter.preprocess([s.image for s in samples]),
                    adapter.tokenize([s.caption for s in samples]), f"embedded model {adapter.name}, test split")
        except (ImportError, ModelUnavailableError, DataUnavailableError) as exc:
            print(f"embedded model unavailable ({exc}); falling back to the tiny random model")
            model = "m2ib-tiny-vit"
    from m2ib.models.sources import load_adapter
    name = "m2ib-tiny-vit" if model == "tiny" else model
    adapter = load_adapter(name, pretrained=None, device=device, seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((80, 96, 3)) * 255).astype("uint8")) for _ in range(pairs)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(pairs)]
    return adapter, adapter.preprocess(images), adapter.tokenize(captions), f"{name} (random weights)"


def m2ib_kwargs(adapter) -> dict:
    """Paper defaults (layer 9, beta 0.1, 10 steps x 10 copies), with the layer moved down to the
    last valid one (adapter.last_valid_layer) on models with fewer blocks."""
    return {"image_layer": min(9, adapter.last_valid_layer("image")),
            "text_layer": min(9, adapter.last_valid_layer("text"))}


FAST = {"rise": {"n_masks": 100}, "kernel_shap": {"n_samples": 50}, "integrated_gradients": {"n_steps": 8}}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded', 'tiny' or an open_clip config name")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=None, help="default: every baseline, then m2ib")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads spin "
                        "against other jobs and inflate small-model timings several-fold; 0 = torch's default)")
    p.add_argument("--fast", action="store_true", help="small RISE/KernelSHAP/IG settings")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter, pixels, text, what = load(args.model, args.pairs, args.device)
    methods = list(args.methods or [m for m in available_methods() if m != "m2ib"])
    has_m2ib = "m2ib" in available_methods()
    if args.methods is None and has_m2ib:
        methods.append("m2ib")
    print(f"{what}; device {args.device}, {torch.get_num_threads()} threads; {args.pairs} pairs, "
          f"both modalities, one pair per call{' (--fast settings)' if args.fast else ''}")

    seconds = {}
    for name in methods:
        kw = m2ib_kwargs(adapter) if name == "m2ib" else {"progress": False, **(FAST.get(name, {}) if args.fast else {})}
        if name == "nib":      # NIB narrows M2IB's bottleneck site: time it at the same layers
            kw.update(m2ib_kwargs(adapter))
        try:
            method = get_method(name, adapter, **kw)
            method.attribute(pixels[:1], text.select([0]), [0])          # warm-up (imports, caches)
            sync(args.device)
            start = time.perf_counter()
            for i in range(args.pairs):
                method.attribute(pixels[i:i + 1], text.select([i]), [i])
            sync(args.device)
        except UnsupportedError as exc:
            print(f"{name:22s} unsupported: {exc}")
            continue
        seconds[name] = (time.perf_counter() - start) / args.pairs
        print(f"{name:22s} {seconds[name]:9.4f} s/pair", flush=True)

    print()
    ref = seconds.get("m2ib")
    print(f"{'method':22s} {'s/pair':>9s} {'x M2IB':>8s}")
    for name, s in seconds.items():
        ratio = f"{s / ref:8.3f}" if ref else "       -"
        print(f"{name:22s} {s:9.4f} {ratio}")
    if ref is None:
        print("(M2IB not timed: m2ib.method unavailable or not requested)")


if __name__ == "__main__":
    main()
