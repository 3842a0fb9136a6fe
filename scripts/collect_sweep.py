"""Join the runs of a Hydra multirun into one table and draw one heatmap per metric.

    python scripts/collect_sweep.py runs/multirun/sweep/<date>   # default: the newest sweep
Writes <out>/<stem>.csv, <stem>.md, <stem>-<metric>-<modality>.png and <stem>.meta.json, stem =
sweep-<identity>, identity = a hash of the jobs' result identities: a sweep of other settings (another
estimator, grid or data) never overwrites this one (out default: runs/sweep-tables; `make reproduce-sweep`
publishes into results/sweep with --publish, from a clean tree).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from m2ib.core.figures import save_figure  # noqa: I001  (first: it selects the Agg backend)

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml

from m2ib.core.errors import InputError
from m2ib.core.metric import table_columns
from m2ib.pipeline.cache import code_version
from m2ib.pipeline.provenance import check_publishable, git_state, package_versions
from m2ib.pipeline.tables import write_meta

#: Every per-pair value column of every registered metric (own-table metrics such as sanity excluded).
METRICS = table_columns()


def sweep_identity(job_identities) -> str:
    """The sweep's name: a hash of its jobs' result identities (each covers methods, settings, model, data, seed)."""
    return hashlib.sha256("\n".join(sorted(job_identities)).encode()).hexdigest()[:10]


def fixed_settings(sweep_dir: Path) -> dict:
    """The first job's resolved method settings (the estimator mode and everything not swept)."""
    for config in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
        return (yaml.safe_load(config.read_text()) or {}).get("method") or {}
    return {}


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    frames, swept = [], []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        tables = [t for t in job.glob("*.csv") if not t.name.endswith(".rows.csv")]
        if not tables:
            print(f"warning: {job} has no table (run failed or still running); skipped", file=sys.stderr)
            continue
        table = pd.read_csv(tables[0])
        for o in overrides:
            key, _, value = o.partition("=")
            key = key.lstrip("+")
            if key.startswith("experiment"):
                continue
            table[key] = _num(value)
            if key not in swept:
                swept.append(key)
        frames.append(table)
    if not frames:
        raise SystemExit(f"no finished runs under {sweep_dir}")
    df = pd.concat(frames, ignore_index=True)
    swept = [k for k in swept if df[k].nunique() > 1]      # fixed overrides are not sweep axes
    return df, swept


def _num(v: str):
    try:
        return float(v) if "." in v or "e" in v else int(v)
    except ValueError:
        return v


def heatmaps(df: pd.DataFrame, swept: list[str], out: Path, stem: str = "sweep", note: str = "") -> list[Path]:
    """One figure per (metric, modality): rows = first swept key, columns = second, panels = the rest."""
    if len(swept) < 2:
        return []
    rows_key, cols_key, rest = swept[0], swept[1], swept[2:]
    paths = []
    for modality, part in df.groupby("modality"):
        for metric in [m for m in METRICS if m in part.columns and part[m].notna().any()]:
            panels = [()] if not rest else sorted(part[rest].drop_duplicates().itertuples(index=False, name=None))
            fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
            lo, hi = part[metric].min(), part[metric].max()       # one colour scale for all panels
            for ax, panel in zip(axes[0], panels):
                sel = part
                for k, v in zip(rest, panel):
                    sel = sel[sel[k] == v]
                grid = sel.pivot_table(index=rows_key, columns=cols_key, values=metric, aggfunc="mean")
                im = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto", vmin=lo, vmax=hi)
                ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
                ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
                ax.set_xlabel(cols_key.split(".")[-1])
                ax.set_ylabel(rows_key.split(".")[-1])
                for (i, j), v in np.ndenumerate(grid.to_numpy()):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
                ax.set_title(", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(rest, panel)) or metric, fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046)
            fig.suptitle(f"{metric} ({modality}){note}", fontsize=10)
            fig.tight_layout()
            paths.append(save_figure(fig, out / f"{stem}-{metric}-{modality}.png"))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?")
    p.add_argument("--out", default="runs/sweep-tables")
    p.add_argument("--publish", action="store_true", help="refuse unless the git tree is clean (or --allow-dirty)")
    p.add_argument("--allow-dirty", action="store_true")
    p.add_argument("--check-only", action="store_true", help="only the publishing check (before a long sweep)")
    args = p.parse_args(argv)
    state = git_state()
    try:
        check_publishable({"publish": args.publish, "allow_dirty": args.allow_dirty}, state)
    except InputError as exc:
        raise SystemExit(f"error: {exc}")
    if args.check_only:
        return
    if args.sweep_dir:
        sweep_dir = Path(args.sweep_dir)
    else:
        candidates = sorted(Path("runs/multirun/sweep").glob("*"))
        if not candidates:
            raise SystemExit("no sweep found under runs/multirun/sweep; run `make sweep` first")
        sweep_dir = candidates[-1]
    df, swept = collect(sweep_dir)
    jobs = sorted({json.loads(m.read_text())["result_identity"] for m in sweep_dir.glob("*/*.meta.json")})
    stem = f"sweep-{sweep_identity(jobs)}"
    settings = fixed_settings(sweep_dir)
    modes = sorted({str(v.get("mode")) for v in settings.values() if isinstance(v, dict) and "mode" in v})
    note = f", mode {'/'.join(modes)}" if modes else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = swept + ["method", "modality", "n"] + [m for m in METRICS if m in df.columns]
    table = df[keep].sort_values(swept + ["modality"])
    table.to_csv(out / f"{stem}.csv", index=False, float_format="%.6g")
    (out / f"{stem}.md").write_text(table.to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n")
    for path in heatmaps(df, swept, out, stem, note):
        print("wrote", path)
    write_meta({"sweep_dir": str(sweep_dir), "swept": swept, "job_identities": jobs, "method": settings,
                "git_commit": state["commit"], "git_clean": not state["dirty_files"],
                "git_dirty_files": state["dirty_files"], "dirty_allowed": args.allow_dirty and bool(state["dirty_files"]),
                "code_version": code_version(), "packages": package_versions()}, out / f"{stem}.meta.json")
    print(f"wrote {out / stem}.csv ({len(df)} rows from {sweep_dir})")


if __name__ == "__main__":
    main()
