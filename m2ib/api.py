"""The Python entry point: explain image-caption pairs with any registered method, in batches."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from m2ib.attributor import concat_attributions, get_method
from m2ib.errors import InputError
from m2ib.io import load_image
from m2ib.types import Attribution


def explain(adapter, images: Sequence, captions: Sequence[str], method: str = "m2ib", *,
            seed: int = 0, pair_seeds: Optional[Sequence[int]] = None, batch_size: int = 8,
            progress: bool = False, **hparams) -> Attribution:
    """Attribute each (image, caption) pair's similarity to image regions and caption tokens.

    images: PIL images or paths. Pair i uses seed pair_seeds[i] (default seed + i), so results do not
    depend on batch_size. hparams go to the method (for M2IB: layer, beta, var, steps, copies, lr,
    init_alpha, optionally image_/text_ prefixed, mode='release'|'normalized', amp).
    Returns one Attribution with image maps (B, H, W) in the preprocessed frame and token scores (B, T).
    """
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise InputError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise InputError("no image-caption pairs given")
    seeds = list(pair_seeds) if pair_seeds is not None else [seed + i for i in range(len(images))]
    if len(seeds) != len(images):
        raise InputError(f"{len(seeds)} pair_seeds for {len(images)} pairs")
    pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
    attributor = get_method(method, adapter, **hparams)
    parts = []
    for start in tqdm(range(0, len(pil), batch_size), disable=not progress, desc=method, unit="batch"):
        stop = start + batch_size
        try:
            pixels = adapter.preprocess(pil[start:stop])
            text = adapter.tokenize(captions[start:stop])
            part = attributor.attribute(pixels, text, seeds[start:stop])
        except InputError as exc:
            raise InputError(f"pairs {start}..{min(stop, len(pil)) - 1} (numbers in the message count from "
                             f"{start}): {exc}") from exc
        part.meta["truncated"] = text.truncated
        parts.append(part)
    return concat_attributions(parts) if len(parts) > 1 else parts[0]
