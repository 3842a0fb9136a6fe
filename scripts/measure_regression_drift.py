"""Measure how much the regression table (experiment=regression) moves between torch thread counts on
this machine: the figures conf/experiment/regression.yaml derives its atol/rtol from.

    python scripts/measure_regression_drift.py [--threads 1 2] [hydra overrides ...]

Runs the composed regression config once per thread count, each with its own empty cache (so every map
is recomputed), writes nothing, and prints the largest absolute (and relative) difference between runs
over the point-estimate cells, over the interval-bound cells (_ci_low/_ci_high), whether every count
(_n) agrees, and the wall time of each run.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

from m2ib.core.metric import METRICS
from m2ib.pipeline.experiment import GROUP_BY, run_experiment


def regression_config(overrides=()) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=regression", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def run_table(cfg: dict, threads: int) -> tuple[pd.DataFrame, float]:
    with tempfile.TemporaryDirectory(prefix="m2ib-drift-") as cache:
        run = dict(cfg, threads=threads, cache_dir=cache, write_results=False, figures=False, progress=False)
        start = time.perf_counter()
        table = run_experiment(run)["table"]
        return table, time.perf_counter() - start


def max_difference(a: pd.DataFrame, b: pd.DataFrame, columns) -> tuple[float, float, str]:
    """(max |a - b|, max |a - b| / |b| where b != 0, 'method/modality column' of the max absolute one)."""
    worst_abs, worst_rel, where = 0.0, 0.0, "-"
    for col in columns:
        x, y = a[col].to_numpy(dtype=float), b[col].to_numpy(dtype=float)
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf"), float("inf"), f"{col} (NaN in one run only)"
        d = np.abs(np.nan_to_num(x) - np.nan_to_num(y))
        if d.max(initial=0.0) > worst_abs:
            i = int(d.argmax())
            worst_abs, where = float(d[i]), f"{a.index[i][0]}/{a.index[i][1]} {col}"
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(np.nan_to_num(y) != 0, d / np.abs(np.nan_to_num(y)), 0.0)
        worst_rel = max(worst_rel, float(rel.max(initial=0.0)))
    return worst_abs, worst_rel, where


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("overrides", nargs="*", help="hydra overrides applied after experiment=regression")
    args = parser.parse_args(argv)
    cfg = regression_config(args.overrides)
    values = [c for m in cfg["metric"] for c in METRICS.get(m).columns]
    bounds = [f"{c}_{s}" for c in values for s in ("ci_low", "ci_high")]
    counts = ["n"] + [f"{c}_n" for c in values]

    tables = {}
    for threads in args.threads:
        table, seconds = run_table(cfg, threads)
        tables[threads] = table.set_index(GROUP_BY).sort_index()
        print(f"threads={threads}: {len(table)} (method, modality) rows, {len(cfg['method'])} methods, {seconds:.1f} s")

    for t1, t2 in itertools.combinations(args.threads, 2):
        a, b = tables[t1], tables[t2]
        if not a.index.equals(b.index):
            print(f"threads {t1} vs {t2}: the tables have different groups")
            continue
        print(f"threads {t1} vs {t2}:")
        for label, cols in (("point cells", values), ("bound cells", bounds)):
            worst_abs, worst_rel, where = max_difference(a, b, cols)
            print(f"  {label:12s} max |diff| {worst_abs:.3g} (at {where}), max relative {worst_rel:.3g}")
        same = all((a[c].to_numpy() == b[c].to_numpy()).all() for c in counts)
        print(f"  counts (_n)  {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
