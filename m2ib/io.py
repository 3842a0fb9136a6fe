"""Reading images and writing maps, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from m2ib.errors import DataUnavailableError, InputError


def load_image(path) -> Image.Image:
    """Open an image file as RGB, or raise an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def save_attribution(attribution, path) -> Path:
    """Maps, token scores and tokens of an Attribution as one compressed .npz file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"token_mask": attribution.token_mask.numpy(),
              "tokens": np.array(["\t".join(t) for t in attribution.tokens])}
    if attribution.image is not None:
        arrays["image"] = attribution.image.numpy()
    if attribution.text is not None:
        arrays["text"] = attribution.text.numpy()
    np.savez_compressed(path, **arrays)
    return path
