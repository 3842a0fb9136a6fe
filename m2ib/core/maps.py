"""The one map normalisation every method, metric and figure uses.

Rule: per map, min-max to [0, 1]. A constant map carries no ranking, so it normalises to all ONES
(every element counts as fully relevant): masking an image with it keeps the image, and two constant
maps compare as identical. Before this rule the code had three (constant -> 0 in M2IB and the sanity
check, -> 1 in the confidence metric); no map of the published tables is constant, so their numbers
did not move.
"""
from __future__ import annotations

import numpy as np
import torch


def normalise_minmax(maps: torch.Tensor) -> torch.Tensor:
    """(B, ...) tensor -> per-row min-max to [0, 1]; constant rows -> ones."""
    flat = maps.reshape(maps.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.ones_like(out)).reshape(maps.shape)


def normalise_minmax_array(values: np.ndarray) -> np.ndarray:
    """One numpy map (any shape) with the same rule."""
    values = np.asarray(values, dtype=np.float64)
    return normalise_minmax(torch.from_numpy(values.reshape(1, -1))).numpy().reshape(values.shape)
