"""Where a box in the original image lands after the model's resize + crop/pad preprocessing.

The released M2IB evaluation scaled boxes ignoring the centre crop; here boxes go through exactly
the geometry of the image transform, so maps and boxes are compared in the same frame. InputFrame
goes the other way for figures: a map of the input frame back onto the original image.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class InputFrame:
    """The model's input geometry: the preprocessed (H, W) frame maps lie in, and how an original
    image was resized into it (`mode` as in resize_crop_params). Figures use it to put a map back on
    the image the user gave."""

    image_size: tuple[int, int]
    resize_mode: str = "shortest"

    @classmethod
    def of(cls, adapter) -> "InputFrame":
        return cls(tuple(int(v) for v in adapter.image_size), adapter.resize_mode)

    def _params(self, original_size: tuple[int, int]):
        h, w = self.image_size
        return resize_crop_params(original_size, (w, h), self.resize_mode)

    def visible_rect(self, original_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in original pixels: the part of the original the model saw (the rest was
        cropped away)."""
        h, w = self.image_size
        sx, sy, ox, oy = self._params(original_size)
        ow, oh = original_size
        return (max(ox / sx, 0.0), max(oy / sy, 0.0), min((ox + w) / sx, float(ow)), min((oy + h) / sy, float(oh)))

    def to_original(self, heatmap, original_size: tuple[int, int], out_size=None) -> np.ndarray:
        """A (H, W) map of the input frame -> (oh, ow) map over the ORIGINAL image (out_size = (ow, oh),
        default the original's own size), bilinear; NaN where the model saw nothing (cropped away).

        Each output pixel centre is mapped forward through the resize + crop (resize_crop_params) and the
        map is read there, so this is exactly the inverse of the preprocessing's geometry."""
        heat = np.asarray(heatmap, dtype=np.float32)
        if heat.shape != tuple(self.image_size):
            raise InputError(f"map has shape {heat.shape}, expected the model's input frame {tuple(self.image_size)}")
        w0, h0 = original_size
        ow, oh = out_size or original_size
        h, w = self.image_size
        sx, sy, ox, oy = self._params(original_size)
        u = (np.arange(ow) + 0.5) * (w0 / ow) * sx - ox          # input-frame x of each output column
        v = (np.arange(oh) + 0.5) * (h0 / oh) * sy - oy
        out = _bilinear(heat, v, u)
        out[~((v >= 0) & (v < h))[:, None] | ~((u >= 0) & (u < w))[None, :]] = np.nan
        return out


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """image read at the grid ys x xs (continuous coordinates, pixel k centred at k + 0.5), bilinear,
    edges clamped (the align_corners=False convention of the model's own upsampling)."""
    def weights(coords, n):
        c = np.clip(coords - 0.5, 0, n - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        return lo, hi, (c - lo).astype(np.float32)
    y0, y1, fy = weights(ys, image.shape[0])
    x0, x1, fx = weights(xs, image.shape[1])
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]
