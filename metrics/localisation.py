"""Localisation: does the map point at the ground truth (boxes for images, target words for text)?

Image side (per sample, in the preprocessed frame; boxes go through the model's resize + centre crop):
- IoU of zero-shot detection (M2IB paper, Wang et al. NeurIPS 2023, MS-CXR): the map becomes a
  region R by a thresholding rule and IoU = |R n G| / |R u G| with G the union of the pair's boxes.
  Rules: 'topk' (default; k = |G|, the true box area), 'otsu' (skimage.filters.threshold_otsu,
  R = map > t), 'fraction' (R = min-max normalised map >= fraction, i.e. a fraction of the maximum
  for maps in [0, 1] such as M2IB's).
- Pointing game (Zhang et al., ECCV 2016, without tolerance by default): is the map's maximum in G.
- IBA bounding-box ratio (Schulz et al., ICLR 2020): share of the n highest-scored pixels inside G,
  n = |G|.
Text side (where target words are known, e.g. the embedded benchmark):
- the same ratio over word tokens (n = number of target tokens), and
- average precision of the token scores against the target tokens (the step-wise definition
  AP = sum_t (R_t - R_{t-1}) P_t over distinct score thresholds, as scikit-learn computes it).

Ties, documented once for all rules: a map carries no ranking among equal values, so every pixel
tied with the k-th highest value joins the top-k region (|R| may exceed k); an Otsu/fraction region
of a constant map is the whole frame; the pointing game scores the share of the maximal pixels that
lie in G (1 or 0 for a unique maximum, the chance level for ties). Consequently a constant map gets
IoU = ratio = pointing = |G| / (H W), and constant token scores get ratio = AP = positives / words.

Text matching rule: open_clip BPE tokens are lower-case word pieces without word-boundary marks.
A target word (lower-cased, whitespace removed; a multi-word phrase counts word by word) is found
wherever a run of consecutive word tokens concatenates exactly to it; every occurrence counts. A
target word found nowhere (e.g. truncated away) is an error naming the sample.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

import logging

from m2ib.core.errors import InputError
from m2ib.core.maps import normalise_minmax_array
from m2ib.core.metric import MetricContext, register_metric
from m2ib.core.progress import progress_bar
from m2ib.core.records import Attribution, Sample
from m2ib.models.base import ModelAdapter
from metrics.inputs import box_mask, image_maps, sample_ids, text_scores

log = logging.getLogger(__name__)

THRESHOLDS = ("topk", "otsu", "fraction")


# ---- regions --------------------------------------------------------------------------------------
def top_k_region(values: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k highest values, ties with the k-th value included."""
    flat = values.ravel()
    k = int(min(max(k, 1), flat.size))
    kth = np.partition(flat, flat.size - k)[flat.size - k]
    return values >= kth


def threshold_region(values: np.ndarray, rule: str = "topk", k: int | None = None,
                     fraction: float = 0.5) -> np.ndarray:
    """The map as a region by one of THRESHOLDS (see the module docstring)."""
    if rule == "topk":
        if k is None:
            raise InputError("threshold 'topk' needs k (the true box area)")
        return top_k_region(values, k)
    if values.min() == values.max():   # constant map: no ranking, every pixel is as likely as any other
        return np.ones(values.shape, dtype=bool)
    if rule == "otsu":
        from skimage.filters import threshold_otsu
        return values > threshold_otsu(values)
    if rule == "fraction":
        if not 0.0 <= fraction <= 1.0:
            raise InputError(f"threshold fraction must be in [0, 1], got {fraction}")
        return normalise_minmax_array(values) >= fraction
    raise InputError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLDS}")


def iou(region: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(region, truth).sum()
    return float(np.logical_and(region, truth).sum() / union) if union else 0.0


def pointing_game(values: np.ndarray, truth: np.ndarray) -> float:
    """Share of the maximal pixels inside the truth (1/0 for a unique maximum)."""
    top = values == values.max()
    return float(np.logical_and(top, truth).sum() / top.sum())


def top_n_ratio(values: np.ndarray, truth: np.ndarray) -> float:
    """IBA ratio: share of the n = |truth| highest-scored elements inside the truth (ties included)."""
    region = top_k_region(values, int(truth.sum()))
    return float(np.logical_and(region, truth).sum() / region.sum())


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Step-wise AP over distinct thresholds: sum_t (R_t - R_{t-1}) * P_t (tied scores form one step)."""
    truth = truth.astype(bool)
    positives = truth.sum()
    if positives == 0:
        raise InputError("average precision needs at least one positive")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    tp = np.cumsum(t)
    last = np.r_[s[1:] != s[:-1], True]          # last index of each tied group
    tp, n = tp[last], (np.nonzero(last)[0] + 1)
    recall = tp / positives
    precision = tp / n
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---- image ---------------------------------------------------------------------------------------
def image_localisation(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample],
                       threshold: str = "topk", fraction: float = 0.5, progress: bool = False) -> pd.DataFrame:
    """One row per sample: iou (by `threshold`), pointing_game, bbox_ratio, box_pixels, region_pixels."""
    if threshold not in THRESHOLDS:
        raise InputError(f"unknown threshold rule {threshold!r}; choose one of {THRESHOLDS}")
    ids = sample_ids(samples)
    maps = image_maps(attribution, samples, adapter.image_size)
    rows = []
    for i, sample in enumerate(progress_bar(samples, desc=f"localisation {attribution.method}", enabled=progress)):
        truth = box_mask(adapter, sample)
        region = threshold_region(maps[i], threshold, k=int(truth.sum()), fraction=fraction)
        rows.append({"sample_id": ids[i], "method": attribution.method, "threshold": threshold,
                     "iou": iou(region, truth), "pointing_game": pointing_game(maps[i], truth),
                     "bbox_ratio": top_n_ratio(maps[i], truth), "box_pixels": int(truth.sum()),
                     "region_pixels": int(region.sum())})
    return pd.DataFrame(rows)


# ---- text ------------------------------------------------------------------------------------------
def _norm(word: str) -> str:
    return "".join(str(word).lower().split())


def target_token_mask(tokens: Sequence[str], word_mask: np.ndarray, target_words: Sequence[str],
                      sample_id: str = "?") -> np.ndarray:
    """(T,) bool: the word tokens that spell a target word (matching rule in the module docstring)."""
    words = [_norm(p) for w in target_words for p in str(w).split()]
    words = [w for w in words if w]
    if not words:
        raise InputError(f"sample {sample_id!r} has no target words")
    pieces = [_norm(tok) if word_mask[j] else None for j, tok in enumerate(tokens)]
    hit = np.zeros(len(pieces), dtype=bool)
    for word in words:
        found = False
        for start in range(len(pieces)):
            text = ""
            for end in range(start, len(pieces)):
                if pieces[end] is None:
                    break
                text += pieces[end]
                if text == word:
                    hit[start:end + 1] = True
                    found = True
                    break
                if not word.startswith(text):
                    break
        if not found:
            raise InputError(f"sample {sample_id!r}: target word {word!r} is not among its caption tokens "
                             f"{[p for p in pieces if p is not None]}")
    return hit


def text_localisation(attribution: Attribution, samples: Sequence[Sample]) -> pd.DataFrame:
    """One row per sample: text_ratio (IBA ratio over word tokens) and text_ap (average precision)."""
    ids = sample_ids(samples)
    scores, mask = text_scores(attribution, samples)
    rows = []
    for i, sample in enumerate(samples):
        if not sample.target_words:
            raise InputError(f"sample {sample.id!r} has no target_words: the text localisation metrics need "
                             f"token ground truth")
        tokens = list(attribution.tokens[i]) + [""] * (mask.shape[1] - len(attribution.tokens[i]))
        truth = target_token_mask(tokens, mask[i], sample.target_words, ids[i])
        s, t = scores[i][mask[i]], truth[mask[i]]
        rows.append({"sample_id": ids[i], "method": attribution.method, "text_ratio": top_n_ratio(s, t),
                     "text_ap": average_precision(s, t), "target_tokens": int(t.sum()), "word_tokens": int(t.size)})
    return pd.DataFrame(rows)


@register_metric("localisation", columns=("iou", "pointing_game", "bbox_ratio", "text_ratio", "text_ap"))
def localisation(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], context: MetricContext,
                 threshold: str = "topk", fraction: float = 0.5) -> pd.DataFrame:
    """Zero-shot detection IoU, pointing game and box ratio; text ratio / AP on target words.

    Image localisation where every sample has boxes, text localisation where every sample has target
    words (a warning says which part is skipped and why)."""
    frames = []
    if attribution.image is not None and all(len(s.boxes) for s in samples):
        rows = image_localisation(attribution, adapter, samples, threshold=threshold, fraction=fraction,
                                  progress=context.progress)
        frames.append(rows.assign(modality="image"))
    else:
        log.warning("%s: no image localisation (no image map, or samples without boxes)", attribution.method)
    if attribution.text is not None and all(s.target_words for s in samples):
        frames.append(text_localisation(attribution, samples).assign(modality="text"))
    else:
        log.warning("%s: no text localisation (no token scores, or no token ground truth)", attribution.method)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


__all__ = ["THRESHOLDS", "image_localisation", "text_localisation", "threshold_region", "iou", "pointing_game",
           "top_n_ratio", "average_precision", "target_token_mask", "localisation"]
