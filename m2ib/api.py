"""The Python entry point: explain image-caption pairs with any registered method, in batches."""
from __future__ import annotations

from typing import Optional, Sequence

from m2ib.core.attributor import attribute_in_batches, get_method
from m2ib.core.errors import InputError
from m2ib.core.images import as_pil
from m2ib.core.records import Attribution, Sample


def explain(adapter, images: Sequence, captions: Sequence[str], method: str = "m2ib", *,
            ids: Optional[Sequence[str]] = None, seed: int = 0, batch_size: int = 8,
            progress: bool = False, **hparams) -> Attribution:
    """Attribute each (image, caption) pair's similarity to image regions and caption tokens.

    images: file paths, PIL images, numpy arrays or tensors. ids: one id per pair (default "0", "1",
    ...); pair i's seed is m2ib.core.seeds.pair_seed(ids[i], seed), the rule the pipeline uses with
    the data set's sample ids, so the same pair, id, seed and hyperparameters give the same map here
    and in a `make`/Hydra run, whatever the batch size. hparams go to the method (for M2IB: layer,
    layers, beta, var, steps, copies, lr, init_alpha, ratio, optionally image_/text_ prefixed, mode, amp;
    layers and betas default to the model's own settings).
    method: a registered name, or a variant `<name>-<label>` (the returned Attribution is labelled so).
    Returns one Attribution with image maps (B, H, W) in the preprocessed frame and token scores (B, T).
    """
    if isinstance(images, (str, bytes)) or isinstance(captions, str):
        raise InputError("images and captions must be sequences (lists), one entry per pair")
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise InputError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise InputError("no image-caption pairs given")
    ids = [str(i) for i in range(len(images))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(images) or len(set(ids)) != len(ids):
        raise InputError(f"ids must be {len(images)} distinct values, one per pair; got {len(ids)} "
                         f"({len(set(ids))} distinct)")
    samples = [Sample(id=i, image=as_pil(im, f"image {n}"), caption=c)
               for n, (i, im, c) in enumerate(zip(ids, images, captions))]
    attributor = get_method(method, adapter, **hparams)
    return attribute_in_batches(attributor, samples, seed=seed, batch_size=batch_size, progress=progress)
