"""Quality checks of the embedded model, through the ModelAdapter interface only.

1. Held-out zero-shot retrieval: image -> caption R@1 among n candidates (its own caption + n-1
   captions of other pairs whose described object is ABSENT from the image, so every candidate is a
   true negative); chance is 1/n.
2. Target use: masking the target box(es) with the background lowers image-caption cosine similarity
   far more than masking a random region of the same size elsewhere in the visible area.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from m2ib.data.generator import _safe_region
from m2ib.core.errors import InputError
from m2ib.core.records import Sample


def _needs_meta(samples: Sequence[Sample]) -> None:
    for s in samples:
        if "objects" not in s.meta or "target" not in s.meta:
            raise InputError(f"sample {s.id}: needs meta['objects'] and meta['target'] (embedded benchmark samples)")


@torch.no_grad()
def embed(adapter, images: Sequence[Image.Image], captions: Sequence[str], batch_size: int = 128):
    img, txt = [], []
    for i in range(0, len(images), batch_size):
        img.append(adapter.encode_image(adapter.preprocess(images[i:i + batch_size])).float().cpu())
    for i in range(0, len(captions), batch_size):
        txt.append(adapter.encode_text(adapter.tokenize(captions[i:i + batch_size])).float().cpu())
    return torch.cat(img), torch.cat(txt)


def _present(caption_of: Sample, image_of: Sample) -> bool:
    colour, shape, size = caption_of.meta["target"]
    use_size = caption_of.meta.get("size_in_caption", True)
    return any(o["colour"] == colour and o["shape"] == shape and (not use_size or o["size"] == size)
               for o in image_of.meta["objects"])


def retrieval_at_1(adapter, samples: Sequence[Sample], n_candidates: int = 20, seed: int = 0) -> dict:
    """Image -> caption R@1 among n_candidates true-negative-filtered candidates."""
    _needs_meta(samples)
    if n_candidates < 2:
        raise InputError(f"n_candidates must be >= 2, got {n_candidates}")
    rng = np.random.default_rng(seed)
    img, txt = embed(adapter, [s.image for s in samples], [s.caption for s in samples])
    hits = []
    for i, s in enumerate(samples):
        valid = [j for j in range(len(samples)) if j != i and not _present(samples[j], s)]
        if len(valid) < n_candidates - 1:
            raise InputError(f"sample {s.id}: only {len(valid)} valid negative captions, need {n_candidates - 1}")
        cand = [i] + rng.choice(valid, n_candidates - 1, replace=False).tolist()
        hits.append(int(torch.argmax(txt[cand] @ img[i]).item() == 0))
    return {"r_at_1": float(np.mean(hits)), "n": len(hits), "n_candidates": n_candidates, "chance": 1.0 / n_candidates}


def _fill(image: np.ndarray, boxes, value) -> np.ndarray:
    out = image.copy()
    for x, y, w, h in boxes:
        out[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = value
    return out


def _overlaps(a, b) -> bool:
    return not (a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1])


def masking_effect(adapter, samples: Sequence[Sample], seed: int = 0) -> dict:
    """Mean drop of image-caption similarity when the target boxes / random equal-size boxes are masked."""
    _needs_meta(samples)
    rng = np.random.default_rng(seed)
    originals, target_masked, random_masked = [], [], []
    for s in samples:
        arr = np.asarray(s.image.convert("RGB"))
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        fill = np.median(border, axis=0).astype(np.uint8)
        x0, y0, x1, y1 = _safe_region((arr.shape[1], arr.shape[0]))
        moved = []
        for x, y, w, h in s.boxes:
            for _ in range(500):
                nx = rng.integers(x0, max(x0 + 1, x1 - int(np.ceil(w)) + 1))
                ny = rng.integers(y0, max(y0 + 1, y1 - int(np.ceil(h)) + 1))
                cand = (float(nx), float(ny), float(w), float(h))
                if not any(_overlaps(cand, b) for b in s.boxes) and not any(_overlaps(cand, m) for m in moved):
                    break
            moved.append(cand)
        originals.append(s.image)
        target_masked.append(Image.fromarray(_fill(arr, s.boxes, fill)))
        random_masked.append(Image.fromarray(_fill(arr, moved, fill)))
    caps = [s.caption for s in samples]
    i0, t = embed(adapter, originals, caps)
    i1, _ = embed(adapter, target_masked, caps)
    i2, _ = embed(adapter, random_masked, caps)
    base, tgt, rnd = (i0 * t).sum(1), (i1 * t).sum(1), (i2 * t).sum(1)
    drop_t, drop_r = (base - tgt).numpy(), (base - rnd).numpy()
    return {"drop_target": float(drop_t.mean()), "drop_random": float(drop_r.mean()),
            "frac_target_drop_larger": float((drop_t > drop_r).mean()), "n": len(samples)}
