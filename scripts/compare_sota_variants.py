"""Grad-ECLIP and LeGrad on the embedded model: the paper's variant against the official code's, and
both against the random map.

For each method: mean (and spread) over pairs of the Spearman rank correlation between the two
variants' image maps (all pixels) and text scores (word tokens), and the image localisation
(metrics.localisation: IoU top-k, pointing game, IBA box ratio) of each variant and of `random`.

    python scripts/compare_sota_variants.py                 # first 50 embedded test pairs
    python scripts/compare_sota_variants.py --pairs 100
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from m2ib.core.attributor import attribute_in_batches, get_method
from m2ib.data.embedded import load_embedded_split
from m2ib.models.embedded import load_embedded_adapter
from metrics.localisation import image_localisation
from metrics.sanity import spearman

#: name -> (paper hyperparameters, official-code hyperparameters)
VARIANTS = {"grad_eclip": ({}, {"variant": "code"}),
            "legrad": ({}, {"variant": "code", "start_layer": -2})}


def rank_agreement(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: Spearman of the image maps, and of the text scores on the word tokens."""
    img = np.array([spearman(x.numpy(), y.numpy()) for x, y in zip(a.image, b.image)])
    txt = np.array([spearman(x[m].numpy(), y[m].numpy()) for x, y, m in zip(a.text, b.text, a.token_mask)])
    return img, txt


def summary(values: np.ndarray) -> str:
    ok = values[~np.isnan(values)]
    return f"{ok.mean():.3f} +- {ok.std(ddof=1) / np.sqrt(len(ok)):.3f} (n={len(ok)})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapter = load_embedded_adapter()
    samples = load_embedded_split("test", limit=args.pairs, progress=False)
    rand = attribute_in_batches(get_method("random", adapter, modalities=["image"], progress=False), samples)
    loc = {"random": image_localisation(rand, adapter, samples)}
    for name, (paper, code) in VARIANTS.items():
        atts = {v: attribute_in_batches(get_method(name, adapter, progress=False, **hp), samples)
                for v, hp in (("paper", paper), ("code", code))}
        img, txt = rank_agreement(atts["paper"], atts["code"])
        print(f"{name}: paper vs code {code}: Spearman image {summary(img)}, text {summary(txt)}")
        for v, att in atts.items():
            loc[f"{name}[{v}]"] = image_localisation(att, adapter, samples)
    print(f"\nimage localisation on {len(samples)} embedded test pairs (mean; box share "
          f"{loc['random']['box_pixels'].mean() / np.prod(adapter.image_size):.3f})")
    print(f"{'method':20s} {'iou':>6s} {'pointing':>9s} {'bbox_ratio':>11s}")
    for name, df in loc.items():
        print(f"{name:20s} {df['iou'].mean():6.3f} {df['pointing_game'].mean():9.3f} {df['bbox_ratio'].mean():11.3f}")


if __name__ == "__main__":
    main()
