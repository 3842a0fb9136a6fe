"""Degradation test: remove inputs most- and least-relevant-first and compare how fast the score falls.

Source: Schulz et al., "Restricting the Flow: Information Bottlenecks for Attribution", ICLR 2020,
Sec. 4 ('Degradation'; defined in prose, no equation), after the MoRF/LeRF curves of Samek et al. 2017.
No retraining (contrast ROAR+, metrics/roar.py). Score s = the pair's cosine similarity (the quantity M2IB
explains); the other modality stays clean.

Image, per pair (choices the paper leaves open are marked *):
- The preprocessed frame is cut into square tiles of `tile` pixels (IBA used 8 x 8 and 14 x 14 on 224 px);
  * default None = one ViT patch, image_size[0] // grid_size[0], so the tiles are the model's own tokens;
  * a frame not divisible by the tile keeps smaller tiles at its right and bottom edges.
- A tile's relevance is the mean of the map over its pixels. MoRF removes tiles in decreasing, LeRF in
  increasing relevance; * ties keep increasing tile index (row-major) in BOTH orders (stable sort), so a
  constant map gives one order both ways and a score of exactly 0.
- * A removed tile takes the `baseline`: 'mean' (default) = 0 in the model's normalised frame, i.e. the
  data set's per-channel mean colour (the zero fill of public IBA-family evaluation code), or 'blur' =
  the same pixels of a Gaussian-blurred copy of the image (sigma `blur_sigma` pixels, default RISE's 5 px
  at 224 px scaled to the frame, 5 H / 224; see metrics/curves_common.py).
- * Tiles are removed cumulatively in `steps` (default 20) steps of evenly spaced fractions, round(k N / K)
  tiles after step k, K = min(steps, N) (one tile per step when there are at most `steps` tiles).
- Each curve is normalised between the full input (1) and the fully degraded input (0):
  (s_k - s_all_removed) / (s_full - s_all_removed), as IBA normalises by the original and the fully
  degraded output; * unless s_full - s_all_removed >= 0.05 (curves_common.MIN_GAP) the pair's curves
  and score are NaN (the ratio is unstable or undefined) and the tables count the pair out.
- degradation = area under LeRF - area under MoRF, trapezoid over the fraction of tiles removed in
  [0, 1]; higher is better (the map's top removes the similarity and its bottom keeps it). Range [-1, 1]
  for curves within [0, 1]; non-monotone curves can leave that range.
Text (the analogue; IBA tests images only): the units are the caption's word tokens (start/end of text
and padding are never touched), ranked by their token scores with the same tie rule, replaced by the
adapter's blank token (TextBatch.with_blanks); one word per step, or `steps` steps when there are more
words; normalised and integrated the same way (fully degraded = every word blanked).
Rows: degradation (registered), morf_auc and lerf_auc per pair; curves `morf` and `lerf`, the normalised
curves on steps + 1 evenly spaced fractions (interpolated where a pair has fewer units than steps; the
scores use the exact points). ROAD (Rong et al., ICML 2022) shows that a fixed fill leaks the removed
shape and imputes removed pixels instead (noisy linear imputation); that is the separate `road` metric,
not a baseline here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from m2ib.core.attributor import MODALITIES
from m2ib.core.errors import InputError
from m2ib.core.metric import MetricContext, register_metric
from m2ib.core.records import Attribution, Sample
from m2ib.models.base import ModelAdapter
from metrics.curves_common import (MIN_GAP, Pair, check_counts, explained_modalities, gaussian_blur, normalise_curve,
                                   on_grid, ranking, ranks, removal_counts, replace_in_order, resolve_blur_sigma,
                                   run_curves, trapezoid_auc, word_drops)

BASELINES = ("mean", "blur")


def tile_size(adapter: ModelAdapter, tile: Optional[int]) -> int:
    """`tile` in pixels of the preprocessed frame; None = one ViT patch (image_size[0] // grid_size[0])."""
    if tile is None:
        return max(1, adapter.image_size[0] // adapter.grid_size[0])
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise InputError(f"degradation: tile must be an integer >= 1 (pixels) or null, got {tile!r}")
    return int(tile)


def tile_labels(size: tuple[int, int], tile: int) -> np.ndarray:
    """(H, W) tile index of every pixel, tiles numbered row-major; edge tiles may be smaller."""
    h, w = size
    cols = -(-w // tile)
    return (np.arange(h)[:, None] // tile) * cols + np.arange(w)[None, :] // tile


def tile_means(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean map value per tile."""
    flat = labels.ravel()
    return np.bincount(flat, weights=values.ravel()) / np.bincount(flat)


def summarise(s_full: float, s_removed: float, morf_inner: np.ndarray, lerf_inner: np.ndarray,
              fractions: np.ndarray, steps: int, min_gap: float = MIN_GAP) -> dict:
    """Normalised MoRF/LeRF curves from their inner points, their areas and the score."""
    morf = normalise_curve(np.r_[s_full, morf_inner, s_removed], s_full, s_removed, min_gap)
    lerf = normalise_curve(np.r_[s_full, lerf_inner, s_removed], s_full, s_removed, min_gap)
    morf_auc, lerf_auc = trapezoid_auc(morf, fractions), trapezoid_auc(lerf, fractions)
    return {"degradation": lerf_auc - morf_auc, "morf_auc": morf_auc, "lerf_auc": lerf_auc,
            "morf": on_grid(fractions, morf, steps), "lerf": on_grid(fractions, lerf, steps)}


def _image_plan(labels: np.ndarray, steps: int, baseline: str, sigma: float, min_gap: float):
    def plan(pair: Pair):
        values = tile_means(pair.values, labels)
        morf, lerf = ranking(values), ranking(values, descending=False)
        same = np.array_equal(morf, lerf)
        counts = removal_counts(len(values), steps)
        pixels = pair.pixels
        fill = torch.zeros_like(pixels) if baseline == "mean" else gaussian_blur(pixels[None], sigma)[0]
        requests = {"removed": (1, [fill])}
        for name, order in (("morf", morf),) if same else (("morf", morf), ("lerf", lerf)):
            pixel_ranks = torch.as_tensor(ranks(order)[labels], device=pixels.device)
            requests[name] = (len(counts) - 2, replace_in_order(pixels, fill, pixel_ranks, counts[1:-1]))

        def finish(s_full: float, r: dict) -> dict:
            return summarise(s_full, r["removed"][0], r["morf"], r["morf" if same else "lerf"],
                             counts / len(values), steps, min_gap)
        return requests, finish
    return plan


def _text_plan(steps: int, min_gap: float):
    def plan(pair: Pair):
        n = len(pair.positions)
        morf, lerf = ranking(pair.values), ranking(pair.values, descending=False)
        same = np.array_equal(morf, lerf)
        counts = removal_counts(n, steps)
        requests = {"removed": (1, word_drops(pair.length, pair.positions, ranks(morf), [n]))}
        for name, order in (("morf", morf),) if same else (("morf", morf), ("lerf", lerf)):
            requests[name] = (len(counts) - 2, word_drops(pair.length, pair.positions, ranks(order), counts[1:-1]))

        def finish(s_full: float, r: dict) -> dict:
            return summarise(s_full, r["removed"][0], r["morf"], r["morf" if same else "lerf"], counts / n, steps,
                             min_gap)
        return requests, finish
    return plan


def degradation_scores(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample],
                       modality: str = "image", tile: Optional[int] = None, steps: int = 20, baseline: str = "mean",
                       blur_sigma: Optional[float] = None, batch_size: int = 32, min_gap: float = MIN_GAP,
                       progress: bool = False) -> pd.DataFrame:
    """One row per sample: degradation, morf_auc, lerf_auc and the curves morf, lerf (module docstring)."""
    if modality not in MODALITIES:
        raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
    check_counts("degradation", steps, batch_size)
    if baseline not in BASELINES:
        raise InputError(f"degradation: baseline must be one of {BASELINES}, got {baseline!r}")
    if modality == "image":
        plan = _image_plan(tile_labels(adapter.image_size, tile_size(adapter, tile)), steps, baseline,
                           resolve_blur_sigma(adapter, blur_sigma), min_gap)
    else:
        plan = _text_plan(steps, min_gap)
    return run_curves(attribution, adapter, samples, modality, plan, batch_size,
                      f"degradation {attribution.method}/{modality}", progress)


@register_metric("degradation", columns=("degradation",), curves=("morf", "lerf"),
                 curve_axes=("fraction of tiles / words removed", "normalised similarity"))
def degradation(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], context: MetricContext,
                modalities: list = ("image", "text"), tile: Optional[int] = None, steps: int = 20,
                baseline: str = "mean", blur_sigma: Optional[float] = None, batch_size: int = 32,
                min_gap: float = MIN_GAP) -> pd.DataFrame:
    """Degradation test (IBA): most- vs least-relevant-first removal, area between the curves.

    degradation_scores for each explained modality (a modality without a map: a warning, no rows)."""
    frames = [degradation_scores(attribution, adapter, samples, modality=m, tile=tile, steps=steps,
                                 baseline=baseline, blur_sigma=blur_sigma, batch_size=batch_size,
                                 min_gap=min_gap, progress=context.progress)
              for m in explained_modalities(attribution, modalities, "degradation")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
