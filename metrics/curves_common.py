"""What the retraining-free perturbation curves share (metrics/degradation.py, metrics/deletion.py).

A curve re-scores a pair after removing (or inserting) more and more of one modality in the order a map
gives, the other modality kept clean. The score is s = the cosine similarity of the pair's normalised
embeddings (ModelAdapter.similarity); the clean side is encoded once per pair and its embedding reused,
which is the same number (similarity is the dot product of encode_image and encode_text; an adapter
that overrides similarity is called through it instead).

Shared rules, documented once:
- Units: image tiles or pixels, or a caption's word tokens (start/end of text and padding never change;
  words are removed with TextBatch.with_blanks and the adapter's blank token).
- Order: ranking() is a stable sort on the unit index, in both directions: equal map values keep their
  index order (row-major for tiles and pixels, token position for words) whether the map is read most- or
  least-relevant-first, so a constant map gives one order both ways.
- Steps: removal_counts(n, steps) removes round(k n / K) units after step k = 0..K, K = min(steps, n)
  (one unit per step when there are no more units than steps), i.e. the fraction k / K up to rounding;
  the curves are integrated over the exact fractions removed, count / n, in [0, 1].
- AUC: trapezoid_auc, the trapezoid rule over those fractions (RISE's and IBA's reference code both
  integrate by the trapezoid rule).
- Curve cells: a pair's curve is linearly interpolated onto steps + 1 evenly spaced fractions
  (on_grid; the identity when K = steps divides n), so every pair of a method and modality has a curve of
  one length for the per-step summary; the scalar scores come from the exact points, not the grid.
- Normalisation: normalise_curve maps (s - bottom) / (top - bottom), defined only where the full input
  beats the fully degraded one by at least `min_gap` (a metric parameter, default MIN_GAP = 0.05 in
  cosine similarity; min_gap <= 0 accepts any non-zero gap, the plain ratio);
  elsewhere the pair's normalised curve and score are NaN and the tables count it out (their <col>_n).
  Why 0.05, not just a non-zero gap: a ratio with a denominator near 0 (or negative: removing everything
  RAISED the similarity) explodes, and a few such pairs dominate a mean. Measured on the embedded test
  split (first 100 pairs, mean-colour removal): 6% of image pairs and 3% of text pairs have a gap below
  0.05, and with the old 1e-6 rule 3-9% of pairs per method had |degradation| > 5 (means of -4 to +1.7
  while the medians were sensible, e.g. Chefer 0.96, random 0.02).
- Blur: gaussian_blur, a separable Gaussian truncated at 3 sigma (radius int(3 sigma + 0.5), as
  scipy.ndimage.gaussian_filter(mode='nearest')) with edge replication, on the model's
  normalised pixels (the normalisation is per-channel affine and the kernel sums to one, so this equals
  blurring the colours). Default sigma: RISE's 5 px at 224 px scaled to the frame, 5 H / 224 (RISE's
  reference code used an 11 x 11 kernel with sigma 5 and zero padding).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from m2ib.core.attributor import MODALITIES
from m2ib.core.errors import InputError
from m2ib.core.progress import progress_bar
from m2ib.core.records import Attribution, Sample, TextBatch
from m2ib.models.base import ModelAdapter
from metrics.inputs import aligned_text_scores, image_maps, sample_ids, text_scores

log = logging.getLogger(__name__)

#: Below this gap between the clean and the fully degraded similarity a normalised curve is NaN.
MIN_GAP = 0.05
#: RISE's blur: sigma 5 px on a 224 px frame, scaled to the model's frame.
RISE_SIGMA, RISE_FRAME = 5.0, 224


# ---- checks -------------------------------------------------------------------------------------------
def explained_modalities(attribution: Attribution, modalities: Sequence[str], metric: str) -> list[str]:
    """The requested modalities the attribution has a map for; unknown names are errors, a missing map a
    warning (the metric has no rows for it)."""
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise InputError(f"{metric}: modalities must be a non-empty list of {MODALITIES}, got {modalities!r}")
    out = []
    for m in modalities:
        if getattr(attribution, m) is None:
            log.warning("%s explains no %s: no %s %s rows", attribution.method, m, m, metric)
        else:
            out.append(m)
    return out


def check_counts(metric: str, steps: int, batch_size: int) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"{metric}: {name} must be an integer >= 1, got {value!r}")


# ---- orders, steps, areas -----------------------------------------------------------------------------
def ranking(values: np.ndarray, descending: bool = True) -> np.ndarray:
    """Indices of a 1-D array by decreasing (or increasing) value; ties in increasing index order."""
    v = np.asarray(values, dtype=np.float64)
    return np.argsort(-v if descending else v, kind="stable")


def ranks(order: np.ndarray) -> np.ndarray:
    """rank[unit] = its position in order."""
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(len(order))
    return out


def removal_counts(n_units: int, steps: int) -> np.ndarray:
    """Units removed after step k = 0..K, K = min(steps, n_units): round(k n / K), half up, from 0 to n."""
    if n_units < 1:
        raise InputError("nothing to remove (no units)")
    k_steps = min(int(steps), int(n_units))
    k = np.arange(k_steps + 1, dtype=np.int64)
    return (2 * k * n_units + k_steps) // (2 * k_steps)


def trapezoid_auc(y: Sequence[float], x: Optional[Sequence[float]] = None) -> float:
    """Area under y(x) by the trapezoid rule; x defaults to evenly spaced points on [0, 1]. NaN in, NaN out."""
    y = np.asarray(y, dtype=np.float64)
    x = np.linspace(0.0, 1.0, len(y)) if x is None else np.asarray(x, dtype=np.float64)
    if y.ndim != 1 or x.shape != y.shape or len(y) < 2:
        raise InputError(f"trapezoid_auc needs two 1-D arrays of one length >= 2, got {x.shape} and {y.shape}")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def normalise_curve(curve: np.ndarray, top: float, bottom: float, min_gap: float = MIN_GAP) -> np.ndarray:
    """(curve - bottom) / (top - bottom); all NaN unless top - bottom >= min_gap (module docstring).
    min_gap <= 0 accepts any non-zero gap of either sign (the plain ratio)."""
    gap = top - bottom
    if not (gap >= min_gap if min_gap > 0 else abs(gap) > 0):
        return np.full(len(curve), np.nan)
    return (np.asarray(curve, dtype=np.float64) - bottom) / gap + 0.0   # + 0.0: no -0.0


def on_grid(x: np.ndarray, y: np.ndarray, steps: int) -> np.ndarray:
    """y(x) linearly interpolated at steps + 1 evenly spaced fractions of [0, 1] (exact where x is that grid)."""
    grid = np.linspace(0.0, 1.0, steps + 1)
    if len(x) == len(grid) and np.allclose(x, grid, rtol=0, atol=1e-12):
        return np.asarray(y, dtype=np.float64).copy()
    return np.interp(grid, x, y)


# ---- perturbations ------------------------------------------------------------------------------------
def resolve_blur_sigma(adapter: ModelAdapter, sigma: Optional[float]) -> float:
    """sigma in pixels of the preprocessed frame; None = RISE's 5 px at 224 px scaled to the frame height."""
    if sigma is None:
        return RISE_SIGMA * adapter.image_size[0] / RISE_FRAME
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise InputError(f"blur_sigma must be a number >= 0 (pixels) or null, got {sigma!r}")
    return float(sigma)


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by a separable Gaussian (truncated at 3 sigma, edges replicated); sigma 0: a copy."""
    if sigma <= 0:
        return pixels.clone()
    radius = int(3.0 * sigma + 0.5)          # scipy.ndimage's truncation rule at 3 sigma
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-x ** 2 / (2.0 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(pixels.device, pixels.dtype)
    b, c, h, w = pixels.shape
    out = pixels.reshape(b * c, 1, h, w)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out.reshape(b, c, h, w)


def replace_in_order(base: torch.Tensor, fill: torch.Tensor, pixel_ranks: torch.Tensor,
                     counts: Iterable[int]) -> Iterator[torch.Tensor]:
    """For each count c: base (C, H, W) with the pixels whose unit rank is < c taken from fill."""
    for c in counts:
        yield torch.where((pixel_ranks < int(c))[None], fill, base)


def word_drops(length: int, positions: np.ndarray, word_ranks: np.ndarray, counts: Iterable[int],
               insert: bool = False) -> Iterator[torch.Tensor]:
    """(T,) bool drop masks for TextBatch.with_blanks: for each count c the words ranked < c are blanked
    (deletion), or every word but those (insertion)."""
    for c in counts:
        hit = word_ranks < int(c)
        drop = torch.zeros(length, dtype=torch.bool)
        drop[torch.as_tensor(positions[~hit if insert else hit], dtype=torch.long)] = True
        yield drop


# ---- scoring ------------------------------------------------------------------------------------------
class PairScorer:
    """s of perturbed variants of a batch of clean pairs, `batch_size` variants per forward pass.

    modality is the perturbed side: a variant is a (3, H, W) image (image) or a (T,) bool drop mask over
    the row's tokens (text); the other side stays the clean input of that row."""

    def __init__(self, adapter: ModelAdapter, pixels: torch.Tensor, text: TextBatch, modality: str,
                 batch_size: int, blank_token_id: int):
        self.adapter, self.pixels, self.text, self.modality = adapter, pixels, text, modality
        self.batch_size, self.blank = int(batch_size), int(blank_token_id)
        self.plain = getattr(type(adapter), "similarity", None) is ModelAdapter.similarity
        with torch.no_grad():
            if self.plain:
                image, words = adapter.encode_image(pixels), adapter.encode_text(text)
                self.kept = words if modality == "image" else image
                self.clean = (image * words).sum(-1).double().cpu().numpy()
            else:
                self.clean = adapter.similarity(pixels, text).double().cpu().numpy()

    def _run(self, rows: list[int], variants: list[torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            if self.modality == "image":
                pixels = torch.stack(variants)
                s = ((self.adapter.encode_image(pixels) * self.kept[rows]).sum(-1) if self.plain
                     else self.adapter.similarity(pixels, self.text.select(rows)))
            else:
                text = self.text.select(rows).with_blanks(torch.stack(variants), self.blank)
                s = ((self.kept[rows] * self.adapter.encode_text(text)).sum(-1) if self.plain
                     else self.adapter.similarity(self.pixels[rows], text))
        return s.double().cpu().numpy()

    def score(self, items: Iterable[tuple[int, torch.Tensor]]) -> np.ndarray:
        """s of each (row, variant), in order."""
        out, rows, batch = [], [], []
        for row, variant in items:
            rows.append(row)
            batch.append(variant)
            if len(batch) == self.batch_size:
                out.append(self._run(rows, batch))
                rows, batch = [], []
        if batch:
            out.append(self._run(rows, batch))
        return np.concatenate(out) if out else np.zeros(0)


@dataclass
class Pair:
    """One clean pair as a plan sees it. image: pixels (3, H, W) and map (H, W); text: the word
    positions in the tokenised row (length T) and their scores."""

    pixels: torch.Tensor
    values: np.ndarray
    positions: Optional[np.ndarray] = None
    length: int = 0


#: A plan turns a Pair into requests {name: (number of variants, the variants, lazily)} and a function
#: finish(s_clean, {name: similarities}) -> the row's values.
Plan = Callable[[Pair], tuple[dict, Callable[[float, dict], dict]]]


def run_curves(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], modality: str,
               plan: Plan, batch_size: int, desc: str, progress: bool = False) -> pd.DataFrame:
    """Check the inputs (metrics.inputs), then for each chunk of `batch_size` pairs: preprocess and
    tokenise, plan every pair, score all their variants in batches of `batch_size`, and finish each row."""
    ids = sample_ids(samples)
    if modality == "image":
        maps = image_maps(attribution, samples, adapter.image_size)
    else:
        scores, _ = text_scores(attribution, samples)
    out = []
    for start in progress_bar(range(0, len(samples), batch_size), desc=desc, enabled=progress):
        chunk = samples[start:start + batch_size]
        pixels = adapter.preprocess([s.image for s in chunk])
        text = adapter.tokenize([s.caption for s in chunk])
        scorer = PairScorer(adapter, pixels, text, modality, batch_size, adapter.blank_token_id)
        if modality == "image":
            pairs = [Pair(pixels[i], maps[start + i]) for i in range(len(chunk))]
        else:
            aligned = aligned_text_scores(attribution, text, ids, start, scores).double().cpu().numpy()
            words = text.word_mask.bool().cpu().numpy()
            pairs = []
            for i in range(len(chunk)):
                positions = np.nonzero(words[i])[0]
                pairs.append(Pair(pixels[i], aligned[i, positions], positions, text.ids.shape[1]))
        plans = [plan(p) for p in pairs]
        items = ((i, v) for i, (requests, _) in enumerate(plans) for _, variants in requests.values()
                 for v in variants)
        flat = scorer.score(items)
        expected = sum(n for requests, _ in plans for n, _ in requests.values())
        if len(flat) != expected:
            raise RuntimeError(f"{desc}: scored {len(flat)} variants, planned {expected}")
        offset = 0
        for i, (requests, finish) in enumerate(plans):
            results = {}
            for name, (n, _) in requests.items():
                results[name] = flat[offset:offset + n]
                offset += n
            out.append({"sample_id": ids[start + i], "method": attribution.method, "modality": modality,
                        **finish(float(scorer.clean[i]), results)})
    return pd.DataFrame(out)
