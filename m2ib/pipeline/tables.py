"""Per-sample rows -> aggregated tables (mean and a 95% bootstrap interval per cell), written as CSV,
Markdown and a metadata sidecar (whose content m2ib.pipeline.provenance builds)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

BOOTSTRAP_SAMPLES = 1000


def bootstrap_ci(values: np.ndarray, seed: int = 0, n: int = BOOTSTRAP_SAMPLES, level: float = 0.95):
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993), seeded."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def aggregate(rows: pd.DataFrame, by: Sequence[str], values: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """One row per group: n (rows), and for each value column its mean, ci_low, ci_high and the number
    of pairs it was computed on, <col>_n (NaNs ignored)."""
    out = []
    for key, group in rows.groupby(list(by), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rec = dict(zip(by, key))
        rec["n"] = len(group)
        for col in values:
            v = pd.to_numeric(group[col], errors="coerce").to_numpy(dtype=float)
            lo, hi = bootstrap_ci(v, seed=seed)
            rec[col] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            rec[f"{col}_ci_low"], rec[f"{col}_ci_high"] = lo, hi
            rec[f"{col}_n"] = int(np.isfinite(v).sum())     # e.g. ROAR+ scores only its 20% evaluation split
        out.append(rec)
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, by: Sequence[str], values: Sequence[str], digits: int = 3) -> str:
    """Markdown with 'mean [low, high]' cells, '(n=k)' where a cell covers fewer pairs than its row."""
    header = list(by) + ["n"] + list(values)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [str(r[b]) for b in by] + [str(int(r["n"]))]
        for v in values:
            m, lo, hi = r[v], r[f"{v}_ci_low"], r[f"{v}_ci_high"]
            cell = "n/a" if not np.isfinite(m) else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            k = r.get(f"{v}_n", r["n"])
            cells.append(cell + (f" (n={int(k)})" if np.isfinite(m) and k != r["n"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, rows: pd.DataFrame, out_dir, stem: str, by, values, meta: dict) -> dict:
    """Write <stem>.csv (aggregated), <stem>.md, <stem>.rows.csv (per sample), <stem>.meta.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "rows": out / f"{stem}.rows.csv",
             "meta": out / f"{stem}.meta.json"}
    table.to_csv(paths["csv"], index=False, float_format="%.6g")
    rows.to_csv(paths["rows"], index=False, float_format="%.6g")
    paths["md"].write_text(to_markdown(table, by, values))
    write_meta(meta, paths["meta"])
    return paths


def write_meta(meta: dict, path) -> Path:
    """The metadata sidecar of a table (what produced it), as sorted JSON."""
    path = Path(path)
    path.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return path
