"""The control: a random map, seeded per pair. A method that does not beat it localises nothing."""
from __future__ import annotations

import torch

from baselines.base import Baseline
from m2ib.core.attributor import register_method
from m2ib.core.seeds import generator


@register_method("random")
class RandomMap(Baseline):
    """Independent U(0, 1) per pixel and per token, drawn on a CPU generator seeded with the pair's
    seed (image and text from separate streams seed and seed + 1 mod 2**63), so it is repeatable,
    batch-independent and device-independent."""

    def explain_image(self, pixels, text, seeds):
        H, W = self.adapter.image_size
        maps = [torch.rand(H, W, generator=generator(s)) for s in seeds]
        return torch.stack(maps).to(pixels.device)

    def explain_text(self, pixels, text, seeds):
        T = text.ids.shape[1]
        scores = [torch.rand(T, generator=generator((s + 1) % 2 ** 63)) for s in seeds]
        return torch.stack(scores).to(text.ids.device)
