"""Checks shared by every metric: that an Attribution lines up with its Samples and the model's frame.

Metrics never trust their inputs: a map of the wrong shape or with NaNs, or a sample without boxes,
would otherwise turn into a plausible-looking but wrong number. Every error names the sample id.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from m2ib.core.errors import InputError
from m2ib.core.geometry import boxes_to_mask
from m2ib.core.records import Attribution, Sample, TextBatch
from m2ib.models.base import ModelAdapter


def sample_ids(samples: Sequence[Sample]) -> list[str]:
    """Ids of the samples, refusing duplicates (rows are keyed by sample id)."""
    ids = [str(s.id) for s in samples]
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]
    if dup:
        raise InputError(f"duplicate sample ids: {sorted(set(dup))[:5]}")
    return ids


def check_rows(attribution: Attribution, samples: Sequence[Sample]) -> None:
    """The attribution has one row per sample."""
    if not isinstance(attribution, Attribution):
        raise InputError(f"expected an Attribution, got {type(attribution).__name__}")
    if len(samples) == 0:
        raise InputError("no samples given")
    if len(attribution) != len(samples):
        raise InputError(f"attribution {attribution.method!r} has {len(attribution)} rows but "
                         f"{len(samples)} samples were given (first sample {samples[0].id!r})")


def image_maps(attribution: Attribution, samples: Sequence[Sample], size: tuple[int, int]) -> np.ndarray:
    """The image maps as a (B, H, W) float64 array after checking shape and finiteness.

    size is (H, W) of the preprocessed frame (adapter.image_size).
    """
    check_rows(attribution, samples)
    maps = attribution.image
    if maps is None:
        raise InputError(f"attribution {attribution.method!r} has no image map "
                         f"(samples {samples[0].id!r}..)")
    if maps.dim() != 3:
        raise InputError(f"attribution {attribution.method!r}: image map must be (B, H, W), got shape "
                         f"{tuple(maps.shape)} (samples {samples[0].id!r}..)")
    if tuple(maps.shape[1:]) != tuple(size):
        raise InputError(f"attribution {attribution.method!r}: image map of sample {samples[0].id!r} has "
                         f"shape {tuple(maps.shape[1:])}, expected the preprocessed frame {tuple(size)}")
    arr = maps.detach().cpu().double().numpy()
    for i, s in enumerate(samples):
        if not np.isfinite(arr[i]).all():
            raise InputError(f"attribution {attribution.method!r}: image map of sample {s.id!r} "
                             f"contains NaN or infinite values")
    return arr


def text_scores(attribution: Attribution, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(scores (B, T) float64, word mask (B, T) bool) after checking shape and finiteness."""
    check_rows(attribution, samples)
    if attribution.text is None:
        raise InputError(f"attribution {attribution.method!r} has no text scores "
                         f"(samples {samples[0].id!r}..)")
    scores = attribution.text.detach().cpu().double().numpy()
    mask = attribution.token_mask.detach().cpu().bool().numpy()
    if scores.ndim != 2 or mask.shape[0] != scores.shape[0] or mask.shape[1] > scores.shape[1]:
        raise InputError(f"attribution {attribution.method!r}: text scores {scores.shape} do not match "
                         f"token mask {mask.shape} (samples {samples[0].id!r}..)")
    mask = np.pad(mask, ((0, 0), (0, scores.shape[1] - mask.shape[1])))
    for i, s in enumerate(samples):
        if not np.isfinite(scores[i][mask[i]]).all():
            raise InputError(f"attribution {attribution.method!r}: text scores of sample {s.id!r} "
                             f"contain NaN or infinite values")
        if not mask[i].any():
            raise InputError(f"attribution {attribution.method!r}: sample {s.id!r} has no word tokens")
    return scores, mask


def frame_mask(adapter: ModelAdapter, boxes, original_size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool union of x, y, w, h boxes given in an image of original_size (width, height), mapped
    through the model's resize + centre crop (adapter.box_to_input_frame); empty where all are cropped away."""
    frame = adapter.box_to_input_frame(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), original_size)
    h, w = adapter.image_size
    return boxes_to_mask(frame, (w, h))


def box_mask(adapter: ModelAdapter, sample: Sample) -> np.ndarray:
    """Union of the sample's true boxes as an (H, W) bool mask in the preprocessed frame.

    Boxes go through the same resize + centre crop as the image (adapter.box_to_input_frame), so
    map and ground truth share one frame. No boxes, bad box values, or boxes that the crop removes
    entirely are errors naming the sample: the localisation metrics are undefined for them.
    """
    boxes = np.asarray(sample.boxes, dtype=np.float64)
    if boxes.size == 0:
        raise InputError(f"sample {sample.id!r} has an empty box list; localisation needs at least one box")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InputError(f"sample {sample.id!r}: boxes must be (K, 4) x, y, w, h, got shape {boxes.shape}")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any():
        raise InputError(f"sample {sample.id!r}: boxes must be finite with positive width and height, "
                         f"got {boxes.tolist()}")
    mask = frame_mask(adapter, boxes, sample.image.size)
    if not mask.any():
        raise InputError(f"sample {sample.id!r}: its boxes {boxes.tolist()} fall outside the preprocessed "
                         f"frame (cropped away by the model's centre crop)")
    return mask


def aligned_text_scores(attribution: Attribution, text: TextBatch, ids: Sequence[str], offset: int,
                        scores: np.ndarray) -> torch.Tensor:
    """Rows offset.. of the attribution's text scores on the positions of `text` (the adapter's
    tokenisation of the same captions), after checking that the word tokens agree."""
    B, T = text.ids.shape
    out = np.zeros((B, T))
    width = min(T, scores.shape[1])
    out[:, :width] = scores[offset:offset + B, :width]
    wm = text.word_mask.cpu().numpy()
    for i in range(B):
        theirs = list(attribution.tokens[offset + i])
        positions = np.nonzero(wm[i])[0]
        if [theirs[j] if j < len(theirs) else None for j in positions] != [text.tokens[i][j] for j in positions]:
            raise InputError(f"sample {ids[offset + i]!r}: the attribution's tokens do not match the adapter's "
                             f"tokenisation of its caption (attribution computed for another caption or model?)")
    return torch.as_tensor(out, device=text.ids.device)
