"""Sanity check by cascading model randomisation (Adebayo et al., NeurIPS 2018, "Sanity Checks for
Saliency Maps"): a map that explains the model must change when the model's weights are destroyed.

Through the adapter only: starting from a copy of the model, the parameter groups of one encoder are
randomised cumulatively in adapter.randomization_order(encoder) (projection first, then the last block,
... down to the input embeddings). After each step the method is re-run and each of its maps is
compared with the original model's map of the same pair:
- image maps: SSIM (skimage.metrics.structural_similarity, data_range 1, 7x7 window, on per-sample
  min-max normalised maps, m2ib.core.maps) and Spearman rank correlation of the pixels;
- text maps: Spearman rank correlation over the word tokens (SSIM is an image measure: NaN).
Spearman is NaN where either map is constant (undefined). `absolute=True` compares |map| as
Adebayo et al. also do. A map independent of the weights (e.g. an edge detector) scores 1 at every
step; a faithful map should fall towards 0.

"Randomise a group" = every parameter tensor in it is overwritten with a seeded normal N(0, sd^2),
sd = the original tensor's standard deviation (a tensor with one element or zero spread, e.g. a
LayerNorm gain of ones, uses its root mean square instead, so all-zero biases stay zero). Noise is
drawn on the CPU from a generator seeded by (seed, encoder, step), so it is identical on any device.
"""
from __future__ import annotations

import logging
import warnings
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from m2ib.core.attributor import MODALITIES, resolve
from m2ib.core.errors import InputError
from m2ib.core.maps import normalise_minmax_array
from m2ib.core.metric import MetricContext, register_metric
from m2ib.core.progress import progress_bar
from m2ib.core.records import Attribution, Sample
from m2ib.models.base import ModelAdapter
from metrics.inputs import image_maps, sample_ids, text_scores

log = logging.getLogger(__name__)


def randomise_parameters(params: Sequence[torch.nn.Parameter], generator: torch.Generator) -> None:
    """Overwrite each tensor with N(0, sd^2) noise of its own scale (see the module docstring)."""
    with torch.no_grad():
        for p in params:
            x = p.detach().double()
            sd = float(x.std()) if x.numel() > 1 else 0.0
            if not sd > 0:
                sd = float(x.pow(2).mean().sqrt())
            noise = torch.randn(tuple(p.shape), generator=generator, dtype=torch.float64) * sd
            p.copy_(noise.to(device=p.device, dtype=p.dtype))


def _seed(seed: int, encoder: str, step: int) -> int:
    return zlib.crc32(f"{int(seed)}:{encoder}:{step}".encode()) & 0x7FFFFFFF


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either input is constant."""
    from scipy.stats import spearmanr
    a, b = np.ravel(a), np.ravel(b)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W) maps after per-map min-max normalisation (data_range 1); the window is
    skimage's default 7, shrunk to the largest odd size that fits smaller maps."""
    from skimage.metrics import structural_similarity
    win = min(7, *a.shape)
    win -= 1 - win % 2
    if win < 3:
        raise InputError(f"maps of shape {a.shape} are too small for SSIM")
    return float(structural_similarity(normalise_minmax_array(a), normalise_minmax_array(b), data_range=1.0, win_size=win))


def _maps(attribution: Attribution, samples, adapter) -> dict[str, tuple]:
    out = {}
    if attribution.image is not None:
        out["image"] = (image_maps(attribution, samples, adapter.image_size), None)
    if attribution.text is not None:
        out["text"] = text_scores(attribution, samples)
    if not out:
        raise InputError(f"attribution {attribution.method!r} has neither an image nor a text map")
    return out


def compare_maps(original: Attribution, randomised: Attribution, samples: Sequence[Sample], adapter: ModelAdapter,
                 absolute: bool = False) -> list[dict]:
    """Per sample and map modality: ssim (image only) and spearman between two attributions."""
    ids = sample_ids(samples)
    ref, new = _maps(original, samples, adapter), _maps(randomised, samples, adapter)
    rows = []
    for modality in ref:
        if modality not in new:
            raise InputError(f"randomised run of {randomised.method!r} lost its {modality} map")
        a_all, mask_a = ref[modality]
        b_all, mask_b = new[modality]
        for i, sid in enumerate(ids):
            a, b = a_all[i], b_all[i]
            if modality == "text":
                width = min(a.shape[0], b.shape[0])
                if not np.array_equal(mask_a[i][:width], mask_b[i][:width]):
                    raise InputError(f"sample {sid!r}: word tokens differ between the original and randomised runs")
                a, b = a[:width][mask_a[i][:width]], b[:width][mask_a[i][:width]]
            if absolute:
                a, b = np.abs(a), np.abs(b)
            rows.append({"sample_id": sid, "map_modality": modality,
                         "ssim": ssim(a, b) if modality == "image" else float("nan"),
                         "spearman": spearman(a, b)})
    return rows


def cascading_randomisation(adapter: ModelAdapter, samples: Sequence[Sample], attribute,
                            encoders: Sequence[str] = MODALITIES, seed: int = 0, absolute: bool = False,
                            method: Optional[str] = None, progress: bool = True,
                            original: Optional[Attribution] = None) -> pd.DataFrame:
    """Rows: sample_id, method, encoder (randomised), step (1 = projection), group, map_modality, ssim, spearman.

    attribute: attribute(adapter, samples) -> Attribution, or a factory adapter -> Attributor, or a
    method name (see m2ib.core.attributor.resolve). `adapter` itself is never modified (copies are).
    original: the method's attribution on the unmodified model, if already computed.
    """
    samples = list(samples)
    sample_ids(samples)
    for e in encoders:
        if e not in MODALITIES:
            raise InputError(f"encoder must be one of {MODALITIES}, got {e!r}")
    fn = resolve(attribute)
    if original is None:
        original = fn(adapter, samples)
    name = method or original.method
    rows = []
    for encoder in encoders:
        model = adapter.copy()
        groups = model.randomization_order(encoder)
        bar = progress_bar(groups, desc=f"sanity {name}/{encoder}", enabled=progress)
        for step, (group, params) in enumerate(bar, start=1):
            gen = torch.Generator().manual_seed(_seed(seed, encoder, step))
            randomise_parameters(params, gen)
            randomised = fn(model, samples)
            for row in compare_maps(original, randomised, samples, adapter, absolute):
                rows.append({"sample_id": row["sample_id"], "method": name, "encoder": encoder, "step": step,
                             "group": group, "map_modality": row["map_modality"], "ssim": row["ssim"], "spearman": row["spearman"]})
    return pd.DataFrame(rows)


def sanity_table(rows: pd.DataFrame, value: str = "spearman") -> pd.DataFrame:
    """Mean `value` per (method, encoder, map_modality) and randomised layer (group name without the
    encoder prefix), columns in cascade order (projection first)."""
    if rows.empty:
        raise InputError("no sanity rows")
    if value not in ("ssim", "spearman"):
        raise InputError(f"value must be 'ssim' or 'spearman', got {value!r}")
    layer = rows.group.astype(str).str.split(".", n=1).str[-1]      # 'image.block2' -> 'block2'
    order = list(dict.fromkeys(layer[rows.step.sort_values(kind="stable").index]))
    table = rows.assign(layer=layer).pivot_table(index=["method", "encoder", "map_modality"], columns="layer",
                                                 values=value, aggfunc="mean", sort=True)
    return table[[c for c in order if c in table.columns]]


def plot_sanity_curve(rows: pd.DataFrame, path, value: str = "spearman") -> Path:
    """One panel per (encoder, map): mean `value` per method against the cascade step; writes a PNG."""
    from m2ib.core.figures import save_figure     # first: it selects the Agg backend
    import matplotlib.pyplot as plt

    if rows.empty:
        raise InputError("no sanity rows to plot")
    panels = rows[["encoder", "map_modality"]].drop_duplicates().sort_values(["encoder", "map_modality"]).values.tolist()
    panels = [(e, m) for e, m in panels if rows[(rows.encoder == e) & (rows.map_modality == m)][value].notna().any()]
    if not panels:
        raise InputError(f"no finite {value} values to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (encoder, modality) in zip(axes[0], panels):
        part = rows[(rows.encoder == encoder) & (rows.map_modality == modality)]
        labels = part.drop_duplicates("step").sort_values("step")
        for method, grp in part.groupby("method", sort=True):
            mean = grp.groupby("step")[value].mean()
            ax.plot([0, *mean.index], [1.0, *mean.values], marker="o", label=method)
        ax.set_xticks([0, *labels.step], ["original", *labels.group], rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{modality} map, {encoder} encoder randomised", fontsize=9)
        ax.set_ylabel(value)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_sanity_tables(rows: pd.DataFrame, out_dir: Path, stem: str) -> dict:
    """<stem>.sanity.rows.csv, and per value (spearman, ssim) a table (.csv, .md) and a curve (.png)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sanity_rows": out / f"{stem}.sanity.rows.csv"}
    rows.to_csv(paths["sanity_rows"], index=False, float_format="%.6g")
    for value in ("spearman", "ssim"):
        table = sanity_table(rows, value)
        paths[f"sanity_{value}"] = out / f"{stem}.sanity-{value}.csv"
        table.to_csv(paths[f"sanity_{value}"], float_format="%.4g")
        (out / f"{stem}.sanity-{value}.md").write_text(table.round(3).to_string() + "\n")
        paths[f"sanity_{value}_curve"] = plot_sanity_curve(rows, out / f"{stem}.sanity-{value}.png", value)
    return paths


@register_metric("sanity", columns=("ssim", "spearman"), table=write_sanity_tables, whole_dataset=True)
def sanity(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], context: MetricContext,
           encoders: list = ("image", "text"), absolute: bool = False, pairs: int = 0) -> pd.DataFrame:
    """Sanity check by cascading model randomisation (Adebayo et al. 2018): per-layer rank correlation.

    Cascading randomisation of the method that produced `attribution` (context.attribute re-runs it
    on each randomised copy; its maps there are not cached). pairs > 0: only the first `pairs` pairs
    (the method is re-run once per randomised group, so this check costs tens of times the maps).
    A method fitted to the model's weights (a trained readout) gives no rows, with a warning: it would
    have to be refitted at every step."""
    if context.attribute is None:
        raise InputError("the sanity check needs the method itself (MetricContext.attribute) to re-run it")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
        raise InputError(f"metric 'sanity': pairs must be an integer >= 0 (0: all pairs), got {pairs!r}")
    if context.fitted_to_weights:
        log.warning("%s is fitted to the model's weights (a trained readout): cascading randomisation would refit "
                    "it at every step, so it gets no sanity rows", attribution.method)
        return pd.DataFrame()
    if pairs and pairs < len(samples):
        samples, attribution = list(samples)[:pairs], attribution.select(range(pairs))
    return cascading_randomisation(adapter, samples, context.attribute, encoders=list(encoders), seed=context.seed,
                                   absolute=absolute, method=attribution.method, progress=context.progress,
                                   original=attribution)
