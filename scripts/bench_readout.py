"""Benchmark: the readout bottleneck (m2ib_readout) against per-sample M2IB, measured in ONE run on the
same pairs, threads and batch size, taking turns batch by batch: pairs/s of each and their ratio, and localisation (image IoU with the
top-k rule, pointing game, text AP; metrics/localisation.py) with the readout's IoU as a fraction of
M2IB's. Readouts missing from the cache are trained first (their training time is printed, not counted).

    python scripts/bench_readout.py                         # embedded test split, first 100 pairs, 1 thread
    python scripts/bench_readout.py --pairs 50 text_alpha=channel  # key=value: m2ib_readout settings
"""
from __future__ import annotations

import argparse
import time

import torch

from m2ib.core.attributor import attribute_in_batches, get_method
from m2ib.core.records import concat_attributions
from m2ib.data.registry import load_dataset
from m2ib.pipeline.readout import conf_adapter, conf_hparams, ensure_readouts
from metrics.localisation import image_localisation, text_localisation


def interleaved(attributors: dict, samples, batch_size: int) -> dict:
    """name -> (Attribution over samples, pairs/s). The methods take turns batch by batch (pipeline
    batching, preprocessing included), so a change of machine load during the run hits both alike."""
    seconds, parts = dict.fromkeys(attributors, 0.0), {name: [] for name in attributors}
    for attributor in attributors.values():
        attribute_in_batches(attributor, samples[:batch_size], batch_size=batch_size)   # warm-up
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        for name, attributor in attributors.items():
            t = time.perf_counter()
            parts[name].append(attribute_in_batches(attributor, chunk, batch_size=batch_size))
            seconds[name] += time.perf_counter() - t
    return {name: (concat_attributions(parts[name]), len(samples) / seconds[name]) for name in attributors}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="a conf/model/<name>.yaml")
    p.add_argument("--split", default="test")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="key=value m2ib_readout settings (YAML values)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hparams = conf_hparams(args.overrides)
    adapter = conf_adapter(args.model)
    for modality, (path, seconds) in ensure_readouts(adapter, hparams).items():
        print(f"readout {modality}: {'cached' if seconds is None else f'trained in {seconds:.0f} s'} ({path.name})")
    samples = load_dataset({"kind": "embedded", "split": args.split, "limit": args.pairs}, progress=False)
    print(f"model {adapter.name}, {len(samples)} {args.split} pairs, {torch.get_num_threads()} thread(s), "
          f"batch {args.batch_size}, both modalities")
    attributors = {name: get_method(name, adapter, progress=False, **hp)
                   for name, hp in (("m2ib", {}), ("m2ib_readout", hparams))}
    rows = {}
    for name, (att, rate) in interleaved(attributors, samples, args.batch_size).items():
        image = image_localisation(att, adapter, samples).mean(numeric_only=True)
        text = text_localisation(att, samples).mean(numeric_only=True)
        rows[name] = dict(rate=rate, iou=image["iou"], pointing=image["pointing_game"], ap=text["text_ap"])
        print(f"{name:13s} {rate:9.2f} pairs/s   image IoU {image['iou']:.4f}   pointing game "
              f"{image['pointing_game']:.3f}   text AP {text['text_ap']:.4f}")
    m, r = rows["m2ib"], rows["m2ib_readout"]
    print(f"pairs/s ratio (readout / per-sample M2IB): {r['rate'] / m['rate']:.1f}x   "
          f"image IoU fraction: {r['iou'] / m['iou']:.3f}   text AP fraction: {r['ap'] / m['ap']:.3f}")


if __name__ == "__main__":
    main()
