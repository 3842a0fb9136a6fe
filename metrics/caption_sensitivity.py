"""Caption sensitivity: does the image map follow the caption? (this project's own test)

Motivation (the issue): a map can localise the named object well simply because that object is the
most salient thing in the image; the localisation metrics cannot tell such a caption-blind map from
one that reads the caption. Here the SAME image is explained again under another caption, with the
same method, hyperparameters and seed rule (context.attribute), and the two maps are compared.
Cost: one extra attribution pass per pair for (a) and one for (b) (both in a single context.attribute
call over up to 2 x len(samples) pairs), i.e. two to three times the cost of the method itself.
Rows: one per pair, modality 'image' (the text side is not tested).

(a) Grounded, where the data set knows another object of the image and a caption naming it
(sample.meta['alternative'] = {caption, target_words, boxes}, see m2ib.core.records.Sample; the
embedded data set builds it with m2ib.data.generator.alternative_caption: the first object whose
attributes no other object shares, in the true caption's wording; pairs without one get NaN). The
image is explained again under that caption as a copy of the sample with id f"{id}|alt". With T = the target's box(es) and O = the other object's box in the preprocessed
frame (pixels inside both count for neither), and mean_X(M) the MEAN map value inside X (not the mass,
so larger boxes and constant offsets are not rewarded):
- named_first_true = 1 if mean_T(M_true) > mean_O(M_true), else 0 (a tie is 0);
- named_first_alt = 1 if mean_O(M_alt) > mean_T(M_alt), else 0;
- named_first_both = both. A caption-blind map (M_alt = M_true) scores 0 always: the box that wins
  under one caption loses (or ties) under the other. Chance level for independent maps is about 1/4.
- box_shift = [r_T(M_true) - r_O(M_true)] - [r_T(M_alt) - r_O(M_alt)], with r_X the mean PERCENTILE
  RANK of the map inside X (ranks over the whole frame, (rank - 0.5) / n, ties at their average rank):
  how far, in rank units, the map's preference moves from the target to the other object when the
  caption changes. In [-2, 2]; 0 for a caption-blind map; > 0 when the map follows the caption. Ranks
  make it invariant to any increasing transform of either map (constant offsets, positive scaling)
  and robust to a few extreme pixels, where z-scores would be dominated by them.
All four are invariant to adding a constant to, or multiplying by a positive number, each map.
When no sample has an alternative, (a) is skipped with a warning (its columns are NaN).

(b) Generic, any data set: the same image is explained with ANOTHER pair's caption, that of the next
sample in the list (cyclically) whose caption differs (id f"{id}|swap"), and
- caption_rank_corr = Spearman rank correlation of the two image maps over all pixels: LOWER means the
  map depends more on the text; a caption-blind map gives 1; NaN when either map is constant or no
  other caption exists. Read it with the method's randomness in mind: the copy's id differs, so its
  pair seed differs, and a stochastic method (M2IB's noise, RISE's masks, the random map, which scores
  about 0) also decorrelates by noise alone, not only by reading the caption.
The issue's reference point, an image-only saliency of the same method (no caption), is not computed:
the methods explain an image-text similarity and have no caption-free mode.
Because the partner caption depends on which samples are evaluated, the metric refuses sharded runs.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from m2ib.core.errors import InputError
from m2ib.core.metric import MetricContext, register_metric
from m2ib.core.records import Attribution, Sample
from m2ib.models.base import ModelAdapter
from metrics.inputs import frame_mask, image_maps, sample_ids
from metrics.sanity import spearman

log = logging.getLogger(__name__)

COLUMNS = ("named_first_true", "named_first_alt", "named_first_both", "box_shift", "caption_rank_corr")


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """(rank - 0.5) / n over all pixels, ties at their average rank (a constant map is all 0.5)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    return ((rankdata(flat, method="average") - 0.5) / flat.size).reshape(np.shape(values))


def grounded_scores(true_map: np.ndarray, alt_map: np.ndarray, target: np.ndarray, other: np.ndarray) -> dict:
    """named_first_true/alt/both and box_shift for one pair (masks: bool (H, W))."""
    t, o = target & ~other, other & ~target
    if not t.any() or not o.any():
        return dict.fromkeys(COLUMNS[:4], float("nan"))
    first_true = int(true_map[t].mean() > true_map[o].mean())
    first_alt = int(alt_map[o].mean() > alt_map[t].mean())
    r_true, r_alt = percentile_ranks(true_map), percentile_ranks(alt_map)
    shift = (r_true[t].mean() - r_true[o].mean()) - (r_alt[t].mean() - r_alt[o].mean())
    return {"named_first_true": first_true, "named_first_alt": first_alt,
            "named_first_both": int(first_true and first_alt), "box_shift": float(shift)}


def swap_partner(samples: Sequence[Sample], i: int) -> Optional[int]:
    """Index of the next sample (cyclically) whose caption differs from sample i's, or None."""
    n = len(samples)
    for step in range(1, n):
        j = (i + step) % n
        if samples[j].caption != samples[i].caption:
            return j
    return None


@register_metric("caption_sensitivity", columns=COLUMNS, whole_dataset=True)
def caption_sensitivity(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample],
                        context: MetricContext, grounded: bool = True, swap: bool = True) -> pd.DataFrame:
    """Does the image map follow the caption? Named-object test and caption-swap rank correlation.

    (a) grounded named-object test and (b) caption-swap rank correlation (module docstring); one row
    per pair, modality 'image'. grounded / swap switch the two parts (each costs an attribution pass)."""
    if not (grounded or swap):
        raise InputError("caption_sensitivity: both parts are off (grounded=false, swap=false)")
    if attribution.image is None:
        log.warning("%s explains no image: no caption sensitivity rows", attribution.method)
        return pd.DataFrame()
    if context.attribute is None:
        raise InputError("caption_sensitivity re-runs the method under other captions: it needs "
                         "context.attribute")
    ids = sample_ids(samples)
    maps = image_maps(attribution, samples, adapter.image_size)
    extra, alt_rows, swap_rows = [], {}, {}
    if grounded:
        for i, s in enumerate(samples):
            alt = s.meta.get("alternative")
            if not alt:
                continue
            boxes = np.asarray(alt["boxes"], dtype=np.float32).reshape(-1, 4)
            alt_rows[i] = (len(extra), boxes)
            extra.append(dataclasses.replace(s, id=f"{s.id}|alt", caption=alt["caption"],
                                             target_words=list(alt.get("target_words") or []) or None,
                                             boxes=boxes, meta={**s.meta, "alternative_of": s.id}))
        if not alt_rows:
            log.warning("%s: no sample names another object of its image (meta['alternative']): no grounded "
                        "caption sensitivity (named_first_*, box_shift)", attribution.method)
    if swap:
        for i, s in enumerate(samples):
            j = swap_partner(samples, i)
            if j is None:
                continue
            swap_rows[i] = len(extra)
            extra.append(dataclasses.replace(s, id=f"{s.id}|swap", caption=samples[j].caption,
                                             target_words=None, boxes=np.zeros((0, 4), dtype=np.float32),
                                             meta={**s.meta, "caption_of": samples[j].id}))
        if not swap_rows:
            log.warning("%s: all captions are equal: no caption_rank_corr", attribution.method)
    other_maps = None
    if extra:
        other = context.attribute(adapter, extra)
        other_maps = image_maps(other, extra, adapter.image_size)
    rows = []
    for i, s in enumerate(samples):
        row = {"sample_id": ids[i], "method": attribution.method, "modality": "image",
               **dict.fromkeys(COLUMNS, float("nan"))}
        if i in alt_rows and len(s.boxes):
            k, boxes = alt_rows[i]
            target = frame_mask(adapter, s.boxes, s.image.size)
            other_box = frame_mask(adapter, boxes, s.image.size)
            row.update(grounded_scores(maps[i], other_maps[k], target, other_box))
        if i in swap_rows:
            row["caption_rank_corr"] = spearman(maps[i], other_maps[swap_rows[i]])
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["COLUMNS", "grounded_scores", "percentile_ranks",
           "swap_partner", "caption_sensitivity"]
