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

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from m2ib.errors import InputError
from m2ib.models.base import ModelAdapter
from m2ib.types import Attribution, Sample, TextBatch
from metrics.inputs import aligned_text_scores, image_maps, sample_ids, text_scores

MODALITIES = ("image", "text")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0, 1]; a constant map (no ranking) becomes all ones."""
    flat = maps.reshape(maps.shape[0], -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo)
    out = (flat - lo[:, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None]
    out = torch.where((span > 0)[:, None], out, torch.ones_like(out))
    return out.reshape(maps.shape)


def mask_pixels(pixels: torch.Tensor, maps: torch.Tensor, normalise: Optional[str] = "minmax",
                release_compat: bool = False) -> torch.Tensor:
    """pixels (B, 3, H, W) times maps (B, H, W); see the module docstring for the two switches."""
    maps = maps.to(device=pixels.device, dtype=pixels.dtype)
    if normalise == "minmax":
        maps = normalise_maps(maps)
    elif normalise is not None:
        raise InputError(f"unknown map normalisation {normalise!r}; use 'minmax' or None")
    if release_compat:
        maps = maps[:, :1, :].expand_as(maps)       # the released script's first-row-only product
    return pixels * maps[:, None]


def blank_low_tokens(text: TextBatch, scores: torch.Tensor, quantile: float, blank_token_id: int) -> TextBatch:
    """Replace word tokens scored strictly below the row's `quantile` of word scores by the blank id."""
    if not 0.0 <= quantile <= 1.0:
        raise InputError(f"text quantile must be in [0, 1], got {quantile}")
    ids = text.ids.clone()
    mask = text.word_mask.bool()
    scores = scores.to(ids.device)
    for i in range(ids.shape[0]):
        words = mask[i].nonzero().flatten()
        values = scores[i, words].double().cpu().numpy()
        cut = np.quantile(values, quantile)
        drop = words[torch.as_tensor(values < cut, device=ids.device)]
        ids[i, drop] = int(blank_token_id)
    return TextBatch(ids, text.eot, text.tokens, text.word_mask, text.truncated, text.captions)


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
        for start in tqdm(starts, desc=f"confidence {attribution.method}/{modality}", disable=not progress,
                          leave=False):
            chunk = samples[start:start + batch_size]
            pixels = adapter.preprocess([s.image for s in chunk])
            text = adapter.tokenize([s.caption for s in chunk])
            img, txt = adapter.encode_image(pixels), adapter.encode_text(text)
            s_all.append((img * txt).sum(-1))
            if modality == "image":
                masked = mask_pixels(pixels, maps[start:start + len(chunk)], normalise, release_compat)
                s_masked.append((adapter.encode_image(masked) * txt).sum(-1))
            else:
                aligned = aligned_text_scores(attribution, text, ids, start, scores)
                s_masked.append((img * adapter.encode_text(blank_low_tokens(text, aligned, quantile, blank))).sum(-1))
    s = torch.cat(s_all).double().cpu().numpy()
    s2 = torch.cat(s_masked).double().cpu().numpy()
    gap = np.maximum(0.0, s - s2)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(s > 0, gap / np.where(s > 0, s, 1.0) * 100.0, np.nan)
    return pd.DataFrame({"sample_id": ids, "method": attribution.method, "modality": modality,
                         "similarity": s, "masked_similarity": s2, "drop": gap * 100.0,
                         "relative_drop": relative, "increase": (s2 > s).astype(int)})


def summarise_confidence(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method and modality: mean drop, mean relative drop (over pairs with s > 0), % increase."""
    if rows.empty:
        raise InputError("no rows to summarise")
    g = rows.groupby(["method", "modality"], sort=True)
    out = pd.DataFrame({"drop": g["drop"].mean(), "relative_drop": g["relative_drop"].mean(),
                        "increase": g["increase"].mean() * 100.0, "n": g.size()})
    return out.reset_index()
