"""Deletion and insertion: the similarity as the map's top inputs are removed from, or added to, the pair.

Source: Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018,
Sec. 4.2 (causal metrics; defined in prose, no equation); the same curves are reported for CLIP by
Grad-ECLIP (Zhao et al. 2024). No retraining. Score s = the pair's cosine similarity, the other modality
kept clean. Choices the paper leaves open are marked *.

Image, per pair:
- Pixels of the preprocessed frame are ranked by decreasing map value; * ties keep increasing row-major
  pixel index (stable sort).
- Deletion: the ranked pixels are set to `baseline_value` in `steps` (default 20) equal chunks,
  round(k H W / steps) pixels after step k (cumulative). * Default 0 in the model's normalised frame =
  the data set's per-channel mean colour (RISE's reference code fills zeros of the normalised input).
  The curve runs from s(full) to s(every pixel removed); lower area is better.
- Insertion: starts from a blurred canvas (as RISE does, so that sharp mask edges add no signal), a Gaussian blur of the
  image with sigma `blur_sigma` pixels (* default RISE's 5 px at 224 px scaled to the frame, 5 H / 224;
  see metrics/curves_common.py), and puts the original pixels back in the same order and chunks. The
  curve runs from s(blurred canvas) to s(full); higher area is better.
- deletion_auc / insertion_auc: area under the RAW similarity curve (not a probability as in RISE, and
  * not normalised, so a pair's level of similarity enters the score), trapezoid over the fraction of
  pixels removed / inserted in [0, 1] (RISE's reference auc() is this rule; its default steps were one
  row of 224 pixels, 224 steps; * here `steps`, coarser and cheaper).
- deletion_auc_norm / insertion_auc_norm: the same areas after normalising each curve between its
  endpoints, (s - s_end) / (s_full - s_end) for deletion and (s - s_canvas) / (s_full - s_canvas) for
  insertion, which removes the level and compares shapes only; * NaN unless s_full exceeds the other
  endpoint by at least 0.05 (curves_common.MIN_GAP: a near-zero denominator explodes), counted out by
  the tables.
Text (the analogue): word tokens (never start/end of text or padding) ranked by their scores with the same
tie rule; deletion blanks them (TextBatch.with_blanks, the adapter's blank token) in decreasing score order;
insertion starts from every word blanked and restores them in that order; one word per step, or `steps`
steps when there are more words.
Curves `deletion` and `insertion`: the raw similarities on steps + 1 evenly spaced fractions (interpolated
where a pair has fewer units than steps; the areas use the exact points).
"""
from __future__ import annotations

import math
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


def summarise(s_full: float, deletion: np.ndarray, insertion: np.ndarray, fractions: np.ndarray,
              steps: int, min_gap: float = MIN_GAP) -> dict:
    """Areas (raw and normalised) and the curves on the common grid, from the full curves."""
    return {"deletion_auc": trapezoid_auc(deletion, fractions),
            "insertion_auc": trapezoid_auc(insertion, fractions),
            "deletion_auc_norm": trapezoid_auc(normalise_curve(deletion, s_full, deletion[-1], min_gap), fractions),
            "insertion_auc_norm": trapezoid_auc(normalise_curve(insertion, s_full, insertion[0], min_gap), fractions),
            "deletion": on_grid(fractions, deletion, steps), "insertion": on_grid(fractions, insertion, steps)}


def _image_plan(steps: int, baseline_value: float, sigma: float, min_gap: float):
    def plan(pair: Pair):
        pixels = pair.pixels
        order = ranking(pair.values.ravel())
        pixel_ranks = torch.as_tensor(ranks(order).reshape(pair.values.shape), device=pixels.device)
        counts = removal_counts(len(order), steps)
        fill = torch.full_like(pixels, baseline_value)
        canvas = gaussian_blur(pixels[None], sigma)[0]
        requests = {"deletion": (len(counts) - 1, replace_in_order(pixels, fill, pixel_ranks, counts[1:])),
                    "canvas": (1, [canvas]),
                    "insertion": (len(counts) - 2, replace_in_order(canvas, pixels, pixel_ranks, counts[1:-1]))}

        def finish(s_full: float, r: dict) -> dict:
            return summarise(s_full, np.r_[s_full, r["deletion"]], np.r_[r["canvas"], r["insertion"], s_full],
                             counts / len(order), steps, min_gap)
        return requests, finish
    return plan


def _text_plan(steps: int, min_gap: float):
    def plan(pair: Pair):
        n = len(pair.positions)
        word_ranks = ranks(ranking(pair.values))
        counts = removal_counts(n, steps)
        requests = {"deletion": (len(counts) - 1, word_drops(pair.length, pair.positions, word_ranks, counts[1:])),
                    "insertion": (len(counts) - 2, word_drops(pair.length, pair.positions, word_ranks, counts[1:-1],
                                                              insert=True))}

        def finish(s_full: float, r: dict) -> dict:
            blank = r["deletion"][-1]     # every word blanked: the end of deletion and the start of insertion
            return summarise(s_full, np.r_[s_full, r["deletion"]], np.r_[blank, r["insertion"], s_full],
                             counts / n, steps, min_gap)
        return requests, finish
    return plan


def deletion_scores(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample],
                    modality: str = "image", steps: int = 20, baseline_value: float = 0.0,
                    blur_sigma: Optional[float] = None, batch_size: int = 32, min_gap: float = MIN_GAP,
                    progress: bool = False) -> pd.DataFrame:
    """One row per sample: deletion_auc, insertion_auc, their _norm variants and the two curves."""
    if modality not in MODALITIES:
        raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
    check_counts("deletion", steps, batch_size)
    if isinstance(baseline_value, bool) or not isinstance(baseline_value, (int, float)) \
            or not math.isfinite(baseline_value):
        raise InputError(f"deletion: baseline_value must be a finite number, got {baseline_value!r}")
    plan = (_image_plan(steps, float(baseline_value), resolve_blur_sigma(adapter, blur_sigma), min_gap)
            if modality == "image" else _text_plan(steps, min_gap))
    return run_curves(attribution, adapter, samples, modality, plan, batch_size,
                      f"deletion {attribution.method}/{modality}", progress)


@register_metric("deletion", columns=("deletion_auc", "insertion_auc", "deletion_auc_norm", "insertion_auc_norm"),
                 curves=("deletion", "insertion"),
                 curve_axes=("fraction of pixels / words deleted or inserted", "similarity"))
def deletion(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], context: MetricContext,
             modalities: list = ("image", "text"), steps: int = 20, baseline_value: float = 0.0,
             blur_sigma: Optional[float] = None, batch_size: int = 32, min_gap: float = MIN_GAP) -> pd.DataFrame:
    """Deletion and insertion AUC (RISE) of the similarity as top-ranked inputs go or come back.

    deletion_scores for each explained modality (a modality without a map: a warning, no rows)."""
    frames = [deletion_scores(attribution, adapter, samples, modality=m, steps=steps, baseline_value=baseline_value,
                              blur_sigma=blur_sigma, batch_size=batch_size, min_gap=min_gap,
                              progress=context.progress)
              for m in explained_modalities(attribution, modalities, "deletion")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
