"""Generate the embedded benchmark's splits into the cache; with --write-manifest, (re)record their hashes.

Normal use needs no script (load_embedded_split generates on first use). Run with --write-manifest only
after a deliberate generator change (and bump GENERATOR_VERSION), then retrain the model.
"""
from __future__ import annotations

import argparse
import json
import tempfile

from m2ib.data import embedded
from m2ib.data.generator import GENERATOR_VERSION, IMAGE_SIZE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write-manifest", action="store_true", help="record the hashes of freshly generated splits")
    ap.add_argument("--splits", nargs="+", default=list(embedded.SPLIT_SIZES))
    args = ap.parse_args(argv)
    if args.write_manifest:
        manifest = {"generator_version": GENERATOR_VERSION, "seed": embedded.DATA_SEED,
                    "image_size": list(IMAGE_SIZE), "splits": {}}
        if embedded.DATA_MANIFEST.is_file():
            old = json.loads(embedded.DATA_MANIFEST.read_text())
            if old.get("seed") == manifest["seed"] and old.get("generator_version") == GENERATOR_VERSION:
                manifest["splits"] = old.get("splits", {})
        for split in args.splits:
            with tempfile.TemporaryDirectory() as tmp:
                embedded.write_split(split, tmp)
                manifest["splits"][split] = embedded.digest_split(split, tmp)
            print(split, manifest["splits"][split])
        embedded.DATA_MANIFEST.parent.mkdir(parents=True, exist_ok=True)
        embedded.DATA_MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for split in args.splits:
        print(split, "->", embedded.ensure_split(split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
