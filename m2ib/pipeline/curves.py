"""Per-step curves of a metric (e.g. similarity after each deletion step): the mean and a bootstrap
interval per step for every method and modality, as long-form CSV and one figure per curve."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from m2ib.core.errors import InputError
from m2ib.core.figures import plt, save_figure
from m2ib.pipeline.tables import bootstrap_ci

GROUP = ["method", "modality"]


def summarise_curves(rows: pd.DataFrame, curves: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """Long form: method, modality, curve, step, mean, ci_low, ci_high, n (pairs)."""
    out = []
    for (method, modality), group in rows.groupby(GROUP, sort=False):
        for curve in curves:
            cells = [np.asarray(c, dtype=float) for c in group[curve] if c is not None]
            if not cells:
                continue
            if len({c.shape for c in cells}) != 1 or cells[0].ndim != 1:
                raise InputError(f"curve {curve!r} of {method}/{modality}: cells must be 1-D arrays of one length")
            stack = np.stack(cells)
            for step in range(stack.shape[1]):
                lo, hi = bootstrap_ci(stack[:, step], seed=seed)
                out.append({"method": method, "modality": modality, "curve": curve, "step": step,
                            "mean": float(np.nanmean(stack[:, step])), "ci_low": lo, "ci_high": hi,
                            "n": int(np.isfinite(stack[:, step]).sum())})
    return pd.DataFrame(out)


def plot_curves(summary: pd.DataFrame, path, title: str, axes_labels=("fraction removed", "similarity")) -> Path:
    """One panel per (curve, modality): methods as lines with their intervals shaded."""
    panels = summary[["curve", "modality"]].drop_duplicates().values.tolist()
    methods = list(dict.fromkeys(summary.method))
    colours = plt.cm.tab20(np.linspace(0, 1, 20))        # 20 distinct colours: no two methods share one
    style = {m: (colours[(2 * i) % 20 + (2 * i) // 20 % 2], "-" if i < 10 else "--") for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (curve, modality) in zip(axes[0], panels):
        part = summary[(summary.curve == curve) & (summary.modality == modality)]
        for method, g in part.groupby("method", sort=False):
            x = g.step / max(int(g.step.max()), 1)
            colour, line = style[method]
            ax.plot(x, g["mean"], label=method, lw=1.2, color=colour, linestyle=line)
            ax.fill_between(x, g.ci_low, g.ci_high, alpha=0.12, color=colour)
        ax.set_title(f"{curve} ({modality})", fontsize=9)
        ax.set_xlabel(axes_labels[0])
        ax.set_ylabel(axes_labels[1])
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_curves(rows: pd.DataFrame, curves: Sequence[str], out_dir, stem: str, metric: str, seed: int = 0,
                 axes_labels=("fraction removed", "similarity")) -> dict:
    """<stem>.<metric>-curves.csv and <stem>.<metric>-curves.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise_curves(rows, curves, seed)
    paths = {f"{metric}_curves": out / f"{stem}.{metric}-curves.csv"}
    summary.to_csv(paths[f"{metric}_curves"], index=False, float_format="%.6g")
    if not summary.empty:
        paths[f"{metric}_curves_png"] = plot_curves(summary, out / f"{stem}.{metric}-curves.png", metric, axes_labels)
    return paths
