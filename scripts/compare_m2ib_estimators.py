"""Compare M2IB's estimator modes (m2ib/method/bottleneck.py) on the embedded benchmark.

For each mode: image localisation (IoU of the top-k region, k = box area; pointing game; share of the
top-n pixels in the box), text localisation (AP, top-n ratio of the target tokens) and confidence drop /
increase (image: pixels kept by the map; text: the lower half of the words blanked), on the first --n
embedded test pairs, plus the rank correlation (Spearman, per pair, mean) of each mode's image maps with
the 'iba' maps and of 'iba' with itself under another run seed (the noise alone: the ceiling).

    python scripts/compare_m2ib_estimators.py                    # first 100 test pairs, CPU
    python scripts/compare_m2ib_estimators.py --n 20 --paper-vars 0.25 4
    python scripts/compare_m2ib_estimators.py --extra wide '{"mode": "iba", "var": 4.0}'
    python scripts/compare_m2ib_estimators.py --paper-vars --extra coiba '{"image_layers": [0, 1, 2], "text_layers": [0, 1]}'
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from m2ib.core.attributor import attribute_in_batches, get_method
from m2ib.data.registry import load_dataset
from m2ib.models.embedded import load_embedded_adapter
from metrics.confidence import confidence_scores
from metrics.localisation import image_localisation, text_localisation
from metrics.sanity import spearman


def run(adapter, samples, seed, batch_size, **hparams):
    attributor = get_method("m2ib", adapter, progress=False, **hparams)   # the iba statistics pass runs here
    start = time.perf_counter()
    att = attribute_in_batches(attributor, samples, seed=seed, batch_size=batch_size)
    return att, (time.perf_counter() - start) / len(samples)


def scores(att, adapter, samples) -> dict:
    img = image_localisation(att, adapter, samples)
    txt = text_localisation(att, samples)
    conf_i = confidence_scores(att, adapter, samples, modality="image")
    conf_t = confidence_scores(att, adapter, samples, modality="text")
    return {"iou": img.iou.mean(), "pointing": img.pointing_game.mean(), "bbox_ratio": img.bbox_ratio.mean(),
            "text_ap": txt.text_ap.mean(), "text_ratio": txt.text_ratio.mean(),
            "img_drop": conf_i["drop"].mean(), "img_increase%": 100 * conf_i.increase.mean(),
            "txt_drop": conf_t["drop"].mean(), "txt_increase%": 100 * conf_t.increase.mean()}


def map_agreement(a, b) -> float:
    return float(np.nanmean([spearman(x.numpy(), y.numpy()) for x, y in zip(a.image, b.image)]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="first n embedded test pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--paper-vars", type=float, nargs="*", default=[0.25, 4.0],
                   help="var values of mode 'paper' (var 1 is 'release' exactly)")
    p.add_argument("--stats-split", default="val", help="embedded split of the 'iba' statistics")
    p.add_argument("--stats-limit", type=int, default=500)
    p.add_argument("--extra", nargs=2, action="append", default=[], metavar=("LABEL", "JSON"),
                   help="another row: a label and M2IB hyperparameters as JSON (repeatable)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    adapter = load_embedded_adapter()
    samples = load_dataset({"kind": "embedded", "split": "test", "limit": args.n}, progress=False)
    stats = {"kind": "embedded", "split": args.stats_split, "limit": args.stats_limit}
    runs = {"release": dict(mode="release"), "normalized": dict(mode="normalized"),
            "iba": dict(mode="iba", stats=stats)}
    runs.update({f"paper var={v:g}": dict(mode="paper", var=v) for v in args.paper_vars})
    runs.update({label: json.loads(hp) for label, hp in args.extra})
    rows, maps = [], {}
    for label, hp in runs.items():
        att, sec = run(adapter, samples, args.seed, args.batch_size, **hp)
        maps[label] = att
        rows.append({"estimator": label, **scores(att, adapter, samples), "s/pair": sec})
        print(f"done: {label}", flush=True)
    other_seed, _ = run(adapter, samples, args.seed + 1, args.batch_size, **runs["iba"])
    for row in rows:
        row["rho_vs_iba"] = map_agreement(maps[row["estimator"]], maps["iba"])
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"\nM2IB estimators, embedded test pairs 0..{args.n - 1}, seed {args.seed}, model defaults "
          f"(layers/betas of m2ib-shapes-vit), iba statistics: {stats}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"iba vs iba with run seed {args.seed + 1} (noise only): image map rho "
          f"{map_agreement(maps['iba'], other_seed):.3f}")


if __name__ == "__main__":
    main()
