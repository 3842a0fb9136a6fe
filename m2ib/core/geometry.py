"""Where a box in the original image lands after the model's resize + crop/pad preprocessing.

The released M2IB evaluation scaled boxes ignoring the centre crop; here boxes go through exactly
the geometry of the image transform, so maps and boxes are compared in the same frame.
"""
from __future__ import annotations

import numpy as np

from m2ib.core.errors import InputError


def resize_crop_params(original_size: tuple[int, int], target_size: tuple[int, int], mode: str = "shortest"):
    """Return (sx, sy, ox, oy): a point (x, y) of the original maps to (x*sx - ox, y*sy - oy).

    original_size and target_size are (width, height). Modes follow open_clip's image_transform:
    'shortest' = Resize(shortest side) + CenterCrop (torchvision rounding), 'squash' = Resize both
    axes, 'longest' = Resize(longest side) + centre pad; 'shortest-floor' = 'shortest' with the crop
    offset rounded down, as Hugging Face's CLIPImageProcessor crops ((new - target) // 2).
    """
    w, h = original_size
    tw, th = target_size
    if w <= 0 or h <= 0:
        raise InputError(f"image size must be positive, got {original_size}")
    if mode == "squash":
        return tw / w, th / h, 0.0, 0.0
    if mode in ("shortest", "shortest-floor"):
        if tw != th:
            raise InputError(f"resize_mode {mode!r} expects a square target size")
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = tw, int(tw * long / short)   # torchvision's Resize(int) rule
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        half = (lambda d: d // 2) if mode == "shortest-floor" else (lambda d: int(round(d / 2.0)))
        ox, oy = half(nw - tw), half(nh - th)
        return nw / w, nh / h, float(ox), float(oy)
    if mode == "longest":
        scale = min(tw / w, th / h)
        nw, nh = round(w * scale), round(h * scale)
        return nw / w, nh / h, -float((tw - nw) // 2), -float((th - nh) // 2)
    raise InputError(f"unknown resize mode {mode!r}")


def boxes_to_input_frame(boxes: np.ndarray, original_size: tuple[int, int], target_size: tuple[int, int],
                         mode: str = "shortest") -> np.ndarray:
    """(K, 4) x, y, w, h in original pixels -> (K, 4) x, y, w, h in the preprocessed frame, clipped
    to it (a box entirely cropped away gets w = h = 0)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy, ox, oy = resize_crop_params(original_size, target_size, mode)
    tw, th = target_size
    x0 = np.clip(boxes[:, 0] * sx - ox, 0, tw)
    y0 = np.clip(boxes[:, 1] * sy - oy, 0, th)
    x1 = np.clip((boxes[:, 0] + boxes[:, 2]) * sx - ox, 0, tw)
    y1 = np.clip((boxes[:, 1] + boxes[:, 3]) * sy - oy, 0, th)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.float32)


def boxes_to_mask(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Union of (K, 4) x, y, w, h boxes as a boolean (H, W) mask; a pixel is inside when its centre is."""
    w, h = size
    mask = np.zeros((h, w), dtype=bool)
    ys = np.arange(h) + 0.5
    xs = np.arange(w) + 0.5
    for x, y, bw, bh in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        rows = (ys >= y) & (ys < y + bh)
        cols = (xs >= x) & (xs < x + bw)
        mask |= rows[:, None] & cols[None, :]
    return mask
