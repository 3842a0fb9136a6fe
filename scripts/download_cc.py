#!/usr/bin/env python
"""Download a seeded sample of the Conceptual Captions validation split (see m2ib/download/cc.py).

Example (on a connected machine):
    python scripts/download_cc.py --tsv Validation_GCC-1.1.0-Validation.tsv --out data/cc_val --n 1000 --seed 0
Then evaluate exactly that subset with data.tsv_path=data/cc_val/subset.tsv, data.image_root=data/cc_val,
data.manifest=data/cc_val/manifest.csv.
"""
import sys

from m2ib.download.cc import main

if __name__ == "__main__":
    sys.exit(main())
