"""Metric names in configs -> the metric functions of `metrics/`, as long-form per-sample rows.

Every row has sample_id, method, modality and the metric's value columns; VALUE_COLUMNS says which
columns a table aggregates. 'increase' is turned into 0/100 per pair so its mean is a percentage.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from m2ib.errors import InputError
from m2ib.types import Attribution, Sample

log = logging.getLogger(__name__)

VALUE_COLUMNS = {
    "confidence": ["drop", "relative_drop", "increase"],
    "localisation": ["iou", "pointing_game", "bbox_ratio", "text_ratio", "text_ap"],
    "roar": ["roar_similarity_before", "roar_similarity", "roar_r1_image_to_text", "roar_r1_text_to_image"],
}


def score(metric: str, params: dict, attribution: Attribution, adapter, samples: Sequence[Sample],
          progress: bool = False) -> pd.DataFrame:
    params = dict(params or {})
    if metric == "confidence":
        from metrics.confidence import confidence_scores
        frames = []
        for modality in params.pop("modalities", ["image", "text"]):
            if getattr(attribution, modality) is None:
                log.warning("%s explains no %s: no %s confidence rows", attribution.method, modality, modality)
                continue
            rows = confidence_scores(attribution, adapter, samples, modality=modality, progress=progress, **params)
            rows["increase"] = rows["increase"] * 100.0
            frames.append(rows)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if metric == "localisation":
        from metrics.localisation import image_localisation, text_localisation
        frames = []
        if attribution.image is not None and all(len(s.boxes) for s in samples):
            rows = image_localisation(attribution, adapter, samples, progress=progress, **params)
            rows["modality"] = "image"
            frames.append(rows)
        else:
            log.warning("%s: no image localisation (no image map, or samples without boxes)", attribution.method)
        if attribution.text is not None and all(s.target_words for s in samples):
            rows = text_localisation(attribution, samples)
            rows["modality"] = "text"
            frames.append(rows)
        else:
            log.warning("%s: no text localisation (no token scores, or no token ground truth)", attribution.method)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if metric == "roar":
        from metrics.roar import RoarConfig, roar_plus
        modalities = [m for m in params.pop("modalities", ["image", "text"]) if getattr(attribution, m) is not None]
        checkpoint_dir = params.pop("checkpoint_dir", None)
        if checkpoint_dir is not None:   # one folder per exact set of maps: other hyperparameters never reuse it
            checkpoint_dir = Path(checkpoint_dir) / attribution.meta.get("cache_key", attribution.method)
        rows = roar_plus(adapter, samples, {attribution.method: lambda _adapter, _samples: attribution},
                         modalities=modalities, config=RoarConfig(**params), random_baseline=False,
                         checkpoint_dir=checkpoint_dir, progress=progress)
        rows = rows.rename(columns={"similarity_before": "roar_similarity_before", "similarity": "roar_similarity",
                                    "r1_image_to_text": "roar_r1_image_to_text",
                                    "r1_text_to_image": "roar_r1_text_to_image"})
        for col in ("roar_r1_image_to_text", "roar_r1_text_to_image"):
            rows[col] = rows[col] * 100.0      # mean of 0/100 per pair = R@1 in percent
        return rows.drop(columns=["n_finetune", "n_eval"])
    raise InputError(f"unknown metric {metric!r}; available: {sorted(VALUE_COLUMNS) + ['sanity']}")
