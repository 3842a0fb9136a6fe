"""Join the per-sample rows of a sharded run (data.shard=i data.num_shards=n) into one table.

    python scripts/merge_shards.py runs/tables/table1/table1-ViT-B-32-cc-n1000-<identity>
(the stem without '-shard<i>of<n>'). Every shard must be present; writes <stem>.csv/.md/.rows.csv/.meta.json
with the bootstrap intervals recomputed over all pairs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

from m2ib.core.errors import InputError
from m2ib.pipeline.experiment import GROUP_BY
from m2ib.pipeline.provenance import check_overwrite
from m2ib.core.metric import table_columns
from m2ib.pipeline.tables import aggregate, write_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stem", help="path prefix of the shard tables, without -shard<i>of<n>")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = p.parse_args(argv)
    stem = Path(args.stem)
    shards = sorted(stem.parent.glob(f"{stem.name}-shard*of*.rows.csv"))
    if not shards:
        print(f"error: no files {stem}-shard<i>of<n>.rows.csv", file=sys.stderr)
        return 2
    found = {tuple(map(int, re.search(r"-shard(\d+)of(\d+)\.rows\.csv$", s.name).groups())) for s in shards}
    total = {n for _, n in found}
    if len(total) != 1 or {i for i, _ in found} != set(range(total.pop())):
        print(f"error: incomplete or mixed shards: {sorted(found)}", file=sys.stderr)
        return 2
    rows = pd.concat([pd.read_csv(s) for s in shards], ignore_index=True)
    values = [c for c in table_columns() if c in rows.columns]
    table = aggregate(rows, GROUP_BY, values, seed=args.seed)
    metas = [json.loads(s.with_name(s.name.replace(".rows.csv", ".meta.json")).read_text()) for s in shards]
    identities = {m.get("result_identity") for m in metas}
    if len(identities) != 1:
        print(f"error: the shards come from different configurations: {sorted(map(str, identities))}", file=sys.stderr)
        return 2
    identity = identities.pop()
    try:
        check_overwrite(stem.parent / f"{stem.name}.meta.json", identity)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {"result_identity": identity, "merged_from": [str(s) for s in shards],
            "n_samples": int(rows["sample_id"].nunique()), "bootstrap_seed": args.seed, "shards": metas}
    paths = write_table(table, rows, stem.parent, stem.name, GROUP_BY, values, meta)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
