"""ROAD: RemOve And Debias (Rong et al., ICML 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods"), image side, through pytorch-grad-cam's implementation.

Nothing of ROAD is re-implemented here: the removal rule, the noisy linear imputation and the score
differences are pytorch_grad_cam.metrics.road (ROADMostRelevantFirst / ROADLeastRelevantFirst, the
classes ROADCombined averages; package grad-cam). This module only supplies what the library expects
of a classifier: a `model` (the image encoder, pixels -> normalised image embedding) and one `target`
per pair (embedding -> cosine similarity with the pair's normalised text embedding), so the score the
library perturbs is s, the similarity every method explains, not a class probability.

What the library computes, per pair and percentile p (read from its source, grad-cam 1.5):
- Removal (RemoveMostRelevantFirst): t = np.percentile(map, p); pixels with map < t are KEPT, every
  other pixel is removed. So MoRF at percentile p removes the (100 - p)% MOST relevant pixels and
  keeps p%; LeRF (the same on 1 - map) removes the (100 - p)% LEAST relevant pixels. The default
  percentiles 10..90 are removal shares 90%..10%, symmetric, so the averages cover 10%..90% removed.
- Imputation (NoisyLinearImputer, ROAD's "noisy linear imputation"): every removed pixel becomes the
  weighted mean of its 8 neighbours (weights 1/6 edge, 1/12 diagonal; a sparse linear system over all
  removed pixels solved with scipy's spsolve) plus N(0, 0.01^2) noise, per channel, in the model's
  normalised input space (the preprocessed pixels; 0.01 there is about 0.003 of the [0, 1] range).
- Score (PerturbationConfidenceMetric, return_diff=True): s'_p - s, the similarity after imputation
  minus the unperturbed similarity (an absolute change of cosine similarity, not a ratio).
- ROADCombined = (LeRF average - MoRF average) / 2 (s cancels).
Reported per pair (modality 'image'; text rows: none, ROAD is defined for images only):
- road_morf = mean over percentiles of MoRF s'_p - s: LOWER (more negative) is better (removing what
  the map ranks first should destroy the similarity);
- road_lerf = the same for LeRF: HIGHER (near 0 or positive) is better;
- road_combined = (road_lerf - road_morf) / 2, exactly ROADCombined: HIGHER is better; a map that
  carries no information scores about 0, a map ranked in reverse below 0.
- Curves road_morf_curve / road_lerf_curve: s'_p - s ordered by the share REMOVED, ascending (100 - p
  for the percentiles sorted from high to low), so step k of the curves figure is the k-th removal share.

Two choices of this wrapper, neither changing the library's definition:
- The map goes to the library as its ranks scaled to [0, 1], ties broken at random with the pair's seed.
  For a map without ties this changes nothing (the library only uses the order of the values: numeric
  percentiles and 1 - map); for a map with ties (Grad-CAM's zeros, a constant map) the removed share is
  then exactly the nominal one, where the library would remove every pixel tied at the threshold (for
  a constant map all of them, at every percentile: the imputation then has no known pixel and returns
  zeros, the data set's mean colour, plus noise, for MoRF and LeRF alike).
- The imputation noise comes from torch's global generator; each library call runs inside
  torch.random.fork_rng seeded by pair_seed(f"{id}|road|{p}", run seed), so scores do not depend on the
  batch, the order or the entry point, the caller's random state is untouched, and MoRF and LeRF at the
  same percentile draw the same noise (so MoRF of a map equals LeRF of its reverse, exactly).
Cost: 2 x len(percentiles) sparse solves and 4 x len(percentiles) image encodes per pair (the library
re-encodes the unperturbed image at each call), one pair per call (per-pair seeds); no re-attribution.
"""
from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from m2ib.core.errors import InputError
from m2ib.core.metric import MetricContext, register_metric
from m2ib.core.progress import progress_bar
from m2ib.core.records import Attribution, Sample
from m2ib.core.seeds import pair_seed
from m2ib.models.base import ModelAdapter
from metrics.inputs import image_maps, sample_ids

log = logging.getLogger(__name__)

#: The library's default percentiles (ROADCombined, ROAD*Average).
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


class ImageEncoder(torch.nn.Module):
    """The 'model' pytorch-grad-cam perturbs: preprocessed pixels (B, 3, H, W) -> normalised image
    embeddings (B, D) of the adapter (whose weights stay frozen and outside this module)."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.adapter.encode_image(pixels)


class SimilarityTarget:
    """A pytorch-grad-cam target: one output row (a normalised image embedding) -> its cosine
    similarity with the pair's normalised text embedding, i.e. the explained s."""

    def __init__(self, text_embedding: torch.Tensor):
        self.text_embedding = text_embedding

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (output * self.text_embedding.to(output.device, output.dtype)).sum(-1)


def rank_map(values: np.ndarray, seed: int) -> np.ndarray:
    """The map's ranks scaled to [0, 1] (float64), ties broken by a uniform draw seeded with `seed`."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    tie = np.random.default_rng(seed).random(flat.size)
    order = np.lexsort((tie, flat))
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[order] = np.arange(flat.size, dtype=np.float64)
    return (ranks / max(flat.size - 1, 1)).reshape(np.shape(values))


def check_percentiles(percentiles) -> list[float]:
    try:
        values = [float(p) for p in percentiles]
    except (TypeError, ValueError):
        raise InputError(f"ROAD percentiles must be numbers, got {percentiles!r}") from None
    if not values or any(not 0.0 < p < 100.0 for p in values) or len(set(values)) != len(values):
        raise InputError(f"ROAD percentiles must be distinct numbers in (0, 100), got {percentiles!r}")
    return values


def road_pair(model: torch.nn.Module, pixels: torch.Tensor, cam: np.ndarray, target: SimilarityTarget,
              percentiles: Sequence[float], seed_of) -> tuple[np.ndarray, np.ndarray]:
    """(MoRF, LeRF) arrays of s'_p - s, one entry per percentile in the given order, for one pair:
    pixels (1, 3, H, W), cam (H, W) (already rank-normalised), seed_of(p) the noise seed at p."""
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst

    cams = np.asarray(cam, dtype=np.float64)[None]
    morf, lerf = [], []
    for p in percentiles:
        for cls, out in ((ROADMostRelevantFirst, morf), (ROADLeastRelevantFirst, lerf)):
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # the imputer calls np.argwhere on a torch tensor (numpy 2 deprecation, the library's)
                warnings.filterwarnings("ignore", "__array_wrap__ must accept context", DeprecationWarning)
                torch.manual_seed(seed_of(p))
                out.append(float(cls(percentile=p)(pixels, cams, [target], model)[0]))
    return np.asarray(morf), np.asarray(lerf)


def road_scores(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample],
                percentiles: Sequence[float] = PERCENTILES, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """One row per sample: road_morf, road_lerf, road_combined and the two curves (module docstring)."""
    percentiles = check_percentiles(percentiles)
    ids = sample_ids(samples)
    maps = image_maps(attribution, samples, adapter.image_size)
    model = ImageEncoder(adapter)
    by_removed = np.argsort(-np.asarray(percentiles), kind="stable")    # removal share 100 - p, ascending
    rows = []
    for i, sample in enumerate(progress_bar(samples, desc=f"road {attribution.method}", enabled=progress)):
        pixels = adapter.preprocess([sample.image])
        with torch.no_grad():
            text = adapter.encode_text(adapter.tokenize([sample.caption]))[0]
        cam = rank_map(maps[i], pair_seed(ids[i], seed))
        morf, lerf = road_pair(model, pixels, cam, SimilarityTarget(text), percentiles,
                               lambda p: pair_seed(f"{ids[i]}|road|{p:g}", seed))
        rows.append({"sample_id": ids[i], "method": attribution.method, "modality": "image",
                     "road_morf": float(np.mean(morf)), "road_lerf": float(np.mean(lerf)),
                     "road_combined": float((np.mean(lerf) - np.mean(morf)) / 2),
                     "road_morf_curve": morf[by_removed], "road_lerf_curve": lerf[by_removed]})
    return pd.DataFrame(rows)


@register_metric("road", columns=("road_morf", "road_lerf", "road_combined"),
                 curves=("road_morf_curve", "road_lerf_curve"),
                 curve_axes=("step over `percentiles` (share of pixels removed, ascending)", "similarity change s' - s"))
def road(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], context: MetricContext,
         percentiles: list = PERCENTILES) -> pd.DataFrame:
    """ROAD (Rong et al. 2022): MoRF / LeRF similarity change with noisy linear imputation.

    ROAD MoRF / LeRF / combined per pair on the image map (no text rows; module docstring)."""
    percentiles = check_percentiles(percentiles)
    if attribution.image is None:
        log.warning("%s explains no image: no ROAD rows (ROAD is defined for images only)", attribution.method)
        return pd.DataFrame()
    return road_scores(attribution, adapter, samples, percentiles, seed=context.seed, progress=context.progress)


__all__ = ["PERCENTILES", "ImageEncoder", "SimilarityTarget", "rank_map", "road_pair", "road_scores", "road"]
