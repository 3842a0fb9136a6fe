"""M2IB as an Attributor: one bottleneck per modality, each explained against the other modality's
clean embedding (Wang et al. 2023, Sec. 3)."""
from __future__ import annotations

import time
from typing import Sequence

import torch

from m2ib.attributor import Attributor, register_method
from m2ib.bottleneck import M2IBConfig, fit_bottleneck
from m2ib.errors import InputError
from m2ib.types import Attribution, TextBatch


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation to [0, 1], as the release does for image maps (constant -> 0)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape)


@register_method("m2ib")
class M2IBAttributor(Attributor):
    """Hyperparameters: an M2IBConfig (`config=`) or its flat keywords (layer, beta, var, steps, copies,
    lr, init_alpha, each optionally image_/text_ prefixed; mode; amp). `modalities` picks what to explain.

    image: capacity summed over channels, class token dropped, bilinearly upsampled to the input frame,
    min-max normalised per map. text: capacity summed over channels per token (nats), SOT/EOT/padding
    zeroed. Raw per-token capacities are kept in meta['image_capacity'] / meta['text_capacity'].
    """

    def __init__(self, adapter, config: M2IBConfig | None = None, modalities=("image", "text"), **hparams):
        super().__init__(adapter, **hparams)
        if config is not None and hparams:
            raise InputError(f"m2ib: give either config= or keyword hyperparameters, not both (got {sorted(hparams)})")
        self.config = (config or M2IBConfig.from_kwargs(**hparams)).validate()
        self.modalities = tuple(modalities)

    def attribute(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> Attribution:
        start = time.perf_counter()
        cfg, ad = self.config, self.adapter
        seeds = list(seeds)
        with torch.no_grad():
            image_emb = ad.encode_image(pixels)
            text_emb = ad.encode_text(text)
        image_map = text_scores = None
        meta = {"image_fitting": None, "text_fitting": None}
        if "image" in self.modalities:
            res = fit_bottleneck(ad, "image", pixels, text_emb, cfg.image, cfg.mode, seeds, cfg.amp)
            image_map = minmax(ad.hidden_to_image_map(res.capacity)).cpu()
            meta.update(image_capacity=res.capacity.cpu(), image_fitting=res.fitting.cpu())
        if "text" in self.modalities:
            res = fit_bottleneck(ad, "text", text, image_emb, cfg.text, cfg.mode, seeds, cfg.amp)
            text_scores = ad.hidden_to_text_scores(res.capacity, text).cpu()
            meta.update(text_capacity=res.capacity.cpu(), text_fitting=res.fitting.cpu())
        meta["similarity"] = (image_emb * text_emb).sum(-1).cpu()
        return Attribution(self.name, image_map, text_scores, text.tokens, text.word_mask.cpu(),
                           seconds=time.perf_counter() - start, meta=meta)
