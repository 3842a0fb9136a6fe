"""Measure the committed embedded model's quality on the test split (the numbers in the assets README).

python scripts/embedded_quality_report.py [--n 500] [--write]   (--write updates m2ib/assets/embedded/quality.json)
"""
from __future__ import annotations

import argparse
import json

import torch

from m2ib.data import embedded
from m2ib.models import embedded as model_assets
from m2ib.data.embedded_quality import masking_effect, retrieval_at_1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=500, help="test pairs")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)   # deterministic; faster than 2 on a busy 2-core machine
    adapter = model_assets.load_embedded_adapter()
    test = embedded.load_embedded_split("test", limit=args.n)
    quality = {"retrieval": retrieval_at_1(adapter, test, n_candidates=args.candidates, seed=0),
               "masking": masking_effect(adapter, test, seed=0),
               "checkpoint_sha256": model_assets.verify_checkpoint(),
               "command": f"python scripts/embedded_quality_report.py --n {args.n} --candidates {args.candidates}"}
    print(json.dumps(quality, indent=2))
    if args.write:
        (model_assets.ASSET_DIR / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
