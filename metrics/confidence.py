"""Faithfulness as confidence drop and increase: keep what the map calls important, re-score the pair.

Confidence s = cosine similarity of the pair's normalised embeddings (the quantity M2IB explains).
- Image: the preprocessed pixels are multiplied by the map over the whole frame (per-sample min-max
  normalised to [0, 1] by default, a constant map counting as all ones, i.e. the image is kept).
  Since the pixels are the model's normalised input, a zero-scored pixel becomes the data set mean
  colour. `release_compat=True` reproduces the released M2IB evaluation, which multiplied by the
  map's FIRST ROW only (broadcast over all rows); it is off by default and exists for comparison.
- Text: word tokens scored strictly below the row's `quantile` of the word-token scores (default 0.5,
  the median) are replaced by a blank token (adapter.blank_token_id unless given); start/end-of-text
  tokens and padding are never touched. Constant scores replace nothing.
Per pair s' is the masked confidence. Reported (Chattopadhyay et al., WACV 2018, Grad-CAM++; used
by M2IB and by the NIB re-run, Zhu et al. ICLR 2025):
- drop = max(0, s - s') * 100 (absolute, as in the released M2IB evaluation),
- relative_drop = max(0, s - s') / s * 100 (Grad-CAM++'s Average Drop; NaN where s <= 0, for which
  the ratio is undefined),
- increase = 1 if s' > s, reported as the % of pairs.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from m2ib.core.attributor import MODALITIES
from m2ib.core.errors import InputError
from m2ib.core.maps import normalise_minmax
from m2ib.core.metric import MetricContext, register_metric
from m2ib.core.progress import progress_bar
from m2ib.core.records import Attribution, Sample, TextBatch
from m2ib.models.base import ModelAdapter
from metrics.inputs import aligned_text_scores, image_maps, sample_ids, text_scores

log = logging.getLogger(__name__)


def mask_pixels(pixels: torch.Tensor, maps: torch.Tensor, normalise: Optional[str] = "minmax",
                release_compat: bool = False) -> torch.Tensor:
    """pixels (B, 3, H, W) times maps (B, H, W); see the module docstring for the two switches."""
    maps = maps.to(device=pixels.device, dtype=pixels.dtype)
    if normalise == "minmax":
        maps = normalise_minmax(maps)
    elif normalise is not None:
        raise InputError(f"unknown map normalisation {normalise!r}; use 'minmax' or None")
    if release_compat:
        maps = maps[:, :1, :].expand_as(maps)       # the released script's first-row-only product
    return pixels * maps[:, None]


def blank_low_tokens(text: TextBatch, scores: torch.Tensor, quantile: float, blank_token_id: int) -> TextBatch:
    """Replace word tokens scored strictly below the row's `quantile` of word scores by the blank id."""
    if not 0.0 <= quantile <= 1.0:
        raise InputError(f"text quantile must be in [0, 1], got {quantile}")
    drop = torch.zeros_like(text.word_mask, dtype=torch.bool)
    mask = text.word_mask.bool()
    scores = scores.to(drop.device)
    for i in range(drop.shape[0]):
        words = mask[i].nonzero().flatten()
        values = scores[i, words].double().cpu().numpy()
        drop[i, words[torch.as_tensor(values < np.quantile(values, quantile), device=drop.device)]] = True
    return text.with_blanks(drop, blank_token_id)


def confidence_scores(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample],
                      modality: str = "image", batch_size: int = 32, normalise: Optional[str] = "minmax",
                      release_compat: bool = False, quantile: float = 0.5,
                      blank_token_id: Optional[int] = None, progress: bool = False) -> pd.DataFrame:
    """One row per sample: similarity s, masked_similarity s', drop, relative_drop, increase."""
    if modality not in MODALITIES:
        raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    ids = sample_ids(samples)
    if modality == "image":
        maps = torch.as_tensor(image_maps(attribution, samples, adapter.image_size), dtype=torch.float32)
    else:
        scores, _ = text_scores(attribution, samples)
    blank = adapter.blank_token_id if blank_token_id is None else int(blank_token_id)
    s_all, s_masked = [], []
    starts = range(0, len(samples), batch_size)
    with torch.no_grad():
        for start in progress_bar(starts, desc=f"confidence {attribution.method}/{modality}", enabled=progress):
            chunk = samples[start:start + batch_size]
            pixels = adapter.preprocess([s.image for s in chunk])
            text = adapter.tokenize([s.caption for s in chunk])
            s_all.append(adapter.similarity(pixels, text))
            if modality == "image":
                masked = mask_pixels(pixels, maps[start:start + len(chunk)], normalise, release_compat)
                s_masked.append(adapter.similarity(masked, text))
            else:
                aligned = aligned_text_scores(attribution, text, ids, start, scores)
                s_masked.append(adapter.similarity(pixels, blank_low_tokens(text, aligned, quantile, blank)))
    s = torch.cat(s_all).double().cpu().numpy()
    s2 = torch.cat(s_masked).double().cpu().numpy()
    gap = np.maximum(0.0, s - s2)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(s > 0, gap / np.where(s > 0, s, 1.0) * 100.0, np.nan)
    return pd.DataFrame({"sample_id": ids, "method": attribution.method, "modality": modality,
                         "similarity": s, "masked_similarity": s2, "drop": gap * 100.0,
                         "relative_drop": relative, "increase": (s2 > s).astype(int)})


@register_metric("confidence", columns=("drop", "relative_drop", "increase"))
def confidence(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], context: MetricContext,
               modalities: list = ("image", "text"), quantile: float = 0.5, normalise: str = "minmax",
               release_compat: bool = False, batch_size: int = 32) -> pd.DataFrame:
    """Confidence drop and increase when only what the map calls important is kept.

    confidence_scores for each explained modality; `increase` as 0/100 per pair, so its mean is the
    percentage of pairs whose confidence rose."""
    frames = []
    for modality in modalities:
        if getattr(attribution, modality) is None:
            log.warning("%s explains no %s: no %s confidence rows", attribution.method, modality, modality)
            continue
        rows = confidence_scores(attribution, adapter, samples, modality=modality, batch_size=batch_size,
                                 normalise=normalise, release_compat=release_compat, quantile=quantile,
                                 progress=context.progress)
        rows["increase"] = rows["increase"] * 100.0
        frames.append(rows)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
