"""Turning what a user passes as an image (a path, a PIL image, a numpy array or a tensor) into an RGB
PIL image, with errors that name the input."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from m2ib.core.errors import DataUnavailableError, InputError

#: Where an image has transparent pixels, they are composited on this colour (white), with a warning.
TRANSPARENT_BACKGROUND = (255, 255, 255)


def load_image(path) -> Image.Image:
    """Open an image file as RGB, or raise an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, str(path))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def to_rgb(image: Image.Image, label: str) -> Image.Image:
    """RGB copy of a PIL image; transparent pixels are composited on TRANSPARENT_BACKGROUND."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            warnings.warn(f"{label} has transparent pixels; they are composited on white "
                          f"{TRANSPARENT_BACKGROUND}", stacklevel=3)
        canvas = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def as_pil(image, label: str = "image") -> Image.Image:
    """A path, PIL image, (H, W[, 3|4]) numpy array or (3, H, W) / (H, W, 3) tensor -> RGB PIL image.

    Arrays: uint8 as they are; floats must be finite and in [0, 1] (scaled by 255). Anything else is
    refused in one line naming `label`."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image, label)
    try:
        import torch
        if isinstance(image, torch.Tensor):
            arr = image.detach().cpu().numpy()
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                arr = np.moveaxis(arr, 0, -1)
            image = arr
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
            raise InputError(f"{label}: an array image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
        if arr.dtype == np.uint8:
            pass
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise InputError(f"{label}: the float image contains NaN or infinite values")
            if arr.min() < 0 or arr.max() > 1:
                raise InputError(f"{label}: a float image must hold values in [0, 1], got "
                                 f"[{arr.min():.3g}, {arr.max():.3g}] (pass uint8 for 0..255)")
            arr = np.round(arr * 255).astype(np.uint8)
        else:
            raise InputError(f"{label}: array images must be uint8 or float in [0, 1], got dtype {arr.dtype}")
        return to_rgb(Image.fromarray(arr), label)
    raise InputError(f"{label}: expected a file path, PIL image, numpy array or tensor, got {type(image).__name__}")
