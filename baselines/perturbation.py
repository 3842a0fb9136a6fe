"""Perturbation baselines: RISE (by hand: captum lacks it), Occlusion and KernelSHAP (captum).

Image removal = the normalised frame's zero, i.e. the preprocessing mean colour. Text features are
the word tokens; removing one replaces it by adapter.blank_token_id (start/end of text kept). Text
methods run on a 0/1 "presence" vector over the words of one pair (see base.presence_text_fn),
so captum's perturbations are exactly token substitutions.

Each pair is explained on its own with its own seed (random draws on a CPU generator), so a pair's
map is the same whatever batch it came in and on whatever device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import KernelShap, Occlusion

from baselines.base import (Baseline, image_embedding, image_score_fn, positive_int, presence_text_fn,
                               probability, text_embedding, word_positions, words_to_scores)
from m2ib.core.attributor import register_method
from m2ib.core.seeds import generator
from m2ib.core.errors import InputError


def _text_emb(adapter, text, b):
    """Pair b's fixed text embedding, encoded ALONE: encoding it within the batch can differ in the
    last bits (another batch shape), which would make a pair's map depend on its batch."""
    return text_embedding(adapter, text.select([b]))


def _image_emb(adapter, pixels, b):
    """Pair b's fixed image embedding, encoded alone (see _text_emb)."""
    return image_embedding(adapter, pixels[b:b + 1])


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


@register_method("rise")
class RISE(Baseline):
    """RISE (Petsiuk et al. 2018): saliency = E[s(x * M) M] / p over random masks M.

    Image masks: a grid x grid Bernoulli(p_keep) pattern, bilinearly upsampled to (grid + 1) cells
    and randomly shifted by up to one cell, as in the paper. Text masks: Bernoulli(p_keep) per word
    token. Defaults: n_masks 500 (the paper uses 4000-8000; 500 keeps a CPU pair in seconds at
    the cost of a noisier map), grid 7, p_keep 0.5, batch_size 50 masked inputs per forward.
    """

    defaults = {"n_masks": 500, "grid": 7, "p_keep": 0.5, "batch_size": 50}

    @classmethod
    def check_values(cls, hp):
        for k in ("n_masks", "grid", "batch_size"):
            positive_int(cls.name, k, hp[k])
        probability(cls.name, "p_keep", hp["p_keep"])

    def _image_masks(self, g):
        """Low-resolution patterns and shifts for all masks of one pair, drawn up front so the
        result does not depend on batch_size."""
        n, s, p = self.hparams["n_masks"], self.hparams["grid"], self.hparams["p_keep"]
        H, W = self.adapter.image_size
        ch, cw = math.ceil(H / s), math.ceil(W / s)
        grids = (torch.rand(n, 1, s, s, generator=g) < p).float()
        dy = torch.randint(0, ch, (n,), generator=g)
        dx = torch.randint(0, cw, (n,), generator=g)
        return grids, dy, dx, ((s + 1) * ch, (s + 1) * cw)

    def explain_image(self, pixels, text, seeds):
        H, W = self.adapter.image_size
        n, p, bs = self.hparams["n_masks"], self.hparams["p_keep"], self.hparams["batch_size"]
        out = []
        for b in self.pairs(len(seeds), "image"):
            grids, dy, dx, up = self._image_masks(generator(seeds[b]))
            score = image_score_fn(self.adapter, _text_emb(self.adapter, text, b))
            sal = torch.zeros(H, W, dtype=torch.float64)
            for lo, hi in _chunks(n, bs):
                big = F.interpolate(grids[lo:hi], size=up, mode="bilinear", align_corners=False)[:, 0]
                masks = torch.stack([big[i, y:y + H, x:x + W] for i, (y, x) in
                                     enumerate(zip(dy[lo:hi].tolist(), dx[lo:hi].tolist()))])
                with torch.no_grad():
                    s = score(pixels[b:b + 1] * masks[:, None].to(pixels.device)).cpu()
                sal += (s.double()[:, None, None] * masks.double()).sum(0)
            out.append((sal / (n * p)).float())
        return torch.stack(out).to(pixels.device)

    def explain_text(self, pixels, text, seeds):
        n, p, bs = self.hparams["n_masks"], self.hparams["p_keep"], self.hparams["batch_size"]
        out = []
        for b in self.pairs(len(seeds), "text"):
            one = text.select([b])
            k = len(word_positions(one, 0))
            presence = (torch.rand(n, k, generator=generator(seeds[b])) < p).float()
            fn = presence_text_fn(self.adapter, one, _image_emb(self.adapter, pixels, b))
            sal = torch.zeros(k, dtype=torch.float64)
            for lo, hi in _chunks(n, bs):
                with torch.no_grad():
                    s = fn(presence[lo:hi]).cpu()
                sal += (s.double()[:, None] * presence[lo:hi].double()).sum(0)
            out.append(words_to_scores(one, 0, (sal / (n * p)).float()).to(pixels.device))
        return torch.stack(out)


@register_method("occlusion")
class OcclusionMap(Baseline):
    """Occlusion (Zeiler & Fergus 2014) via captum: the drop of s when a window is set to the
    baseline, averaged over the windows covering each pixel (positive = evidence for the match).

    Image: square window of `window` pixels (default None = one ViT patch, image_size / grid_size)
    moved by `stride` (default None = half a window). Text: windows of `text_window` word tokens
    (default 1, i.e. leave-one-word-out). batch_size: occluded inputs per forward (32).
    Deterministic: seeds are not used.
    """

    defaults = {"window": None, "stride": None, "text_window": 1, "batch_size": 32}

    @classmethod
    def check_values(cls, hp):
        for k in ("window", "stride"):
            if hp[k] is not None:
                positive_int(cls.name, k, hp[k])
        positive_int(cls.name, "text_window", hp["text_window"])
        positive_int(cls.name, "batch_size", hp["batch_size"])

    def setup(self):
        H, W = self.adapter.image_size
        win = self._window()
        if win > min(H, W):
            raise InputError(f"method {self.name!r}: window {win} is larger than the {H}x{W} input of "
                             f"{self.adapter.name}")

    def _window(self) -> int:
        if self.hparams["window"] is not None:
            return self.hparams["window"]
        return max(1, self.adapter.image_size[0] // self.adapter.grid_size[0])

    def explain_image(self, pixels, text, seeds):
        win = self._window()
        stride = self.hparams["stride"] or max(1, win // 2)
        out = []
        for b in self.pairs(len(seeds), "image"):
            occ = Occlusion(image_score_fn(self.adapter, _text_emb(self.adapter, text, b)))
            with torch.no_grad():
                attr = occ.attribute(pixels[b:b + 1], sliding_window_shapes=(3, win, win),
                                     strides=(3, stride, stride), baselines=0.0,
                                     perturbations_per_eval=self.hparams["batch_size"])
            out.append(attr[0].mean(0))
        return torch.stack(out)

    def explain_text(self, pixels, text, seeds):
        out = []
        for b in self.pairs(len(seeds), "text"):
            one = text.select([b])
            k = len(word_positions(one, 0))
            if k == 0:   # nothing to occlude (cannot come from adapter.tokenize, which rejects it)
                out.append(torch.zeros(text.ids.shape[1], device=pixels.device))
                continue
            win = min(self.hparams["text_window"], k)
            fn = presence_text_fn(self.adapter, one, _image_emb(self.adapter, pixels, b))
            with torch.no_grad():
                attr = Occlusion(fn).attribute(torch.ones(1, k, device=pixels.device), sliding_window_shapes=(win,),
                                               strides=1, baselines=0.0,
                                               perturbations_per_eval=self.hparams["batch_size"])
            out.append(words_to_scores(one, 0, attr[0]))
        return torch.stack(out)


def superpixels(image: torch.Tensor, n_segments: int, compactness: float) -> np.ndarray:
    """SLIC superpixels (Achanta et al. 2012, skimage) of one (3, H, W) preprocessed image, min-max
    rescaled to [0, 1] first since SLIC's Lab conversion expects RGB in that range.

    SLIC finds no regions in a flat image and merges pixel noise into one region (its connectivity
    step); with fewer than 2 segments a regular grid of about n_segments cells is used instead, so
    KernelSHAP always has features to attribute to."""
    from skimage.segmentation import slic

    arr = image.detach().float().cpu().permute(1, 2, 0).numpy().astype(np.float64)
    lo, hi = arr.min(), arr.max()
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    seg = slic(arr, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    _, seg = np.unique(seg, return_inverse=True)   # consecutive labels 0..K-1
    seg = seg.reshape(arr.shape[:2])
    if seg.max() < 1:
        seg = grid_segments(arr.shape[:2], n_segments)
    return seg


def grid_segments(size: tuple[int, int], n_segments: int) -> np.ndarray:
    """(H, W) labels of a regular grid of about n_segments rectangular cells."""
    H, W = size
    side = max(1, int(round(math.sqrt(n_segments))))
    rows = np.minimum(np.arange(H) * side // H, side - 1)
    cols = np.minimum(np.arange(W) * side // W, side - 1)
    return rows[:, None] * side + cols[None, :]


@register_method("kernel_shap")
class KernelSHAPMap(Baseline):
    """KernelSHAP (Lundberg & Lee 2017) via captum. Image features = SLIC superpixels of the
    preprocessed image (n_segments 50, compactness 10), removed to the mean colour; text features =
    word tokens, removed to the blank token. n_samples 200 coalitions per pair and modality (captum's
    sampler, seeded per pair; exact SHAP would need 2^features), batch_size 50 per forward.
    With a single feature the Shapley value is exactly s(all) - s(none) and is computed directly.
    """

    defaults = {"n_samples": 200, "n_segments": 50, "compactness": 10.0, "batch_size": 50}

    @classmethod
    def check_values(cls, hp):
        for k in ("n_samples", "n_segments", "batch_size"):
            positive_int(cls.name, k, hp[k])
        c = hp["compactness"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0:
            raise InputError(f"method {cls.name!r}: hyperparameter compactness must be > 0, got {c!r}")

    def _shap(self, fn, inputs, feature_mask, n_features, seed):
        with torch.no_grad():
            if n_features < 2:
                full, empty = fn(inputs), fn(torch.zeros_like(inputs))
                return (full - empty).reshape(1, *([1] * (inputs.dim() - 1))).expand_as(inputs).clone()
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(seed))
                return KernelShap(fn).attribute(inputs, baselines=0.0, feature_mask=feature_mask,
                                                n_samples=self.hparams["n_samples"],
                                                perturbations_per_eval=self.hparams["batch_size"])

    def explain_image(self, pixels, text, seeds):
        out = []
        for b in self.pairs(len(seeds), "image"):
            seg = superpixels(pixels[b], self.hparams["n_segments"], float(self.hparams["compactness"]))
            mask = torch.from_numpy(seg).long().to(pixels.device)[None, None]
            attr = self._shap(image_score_fn(self.adapter, _text_emb(self.adapter, text, b)), pixels[b:b + 1], mask,
                              int(seg.max()) + 1, seeds[b])
            out.append(attr[0, 0])
        return torch.stack(out)

    def explain_text(self, pixels, text, seeds):
        out = []
        for b in self.pairs(len(seeds), "text"):
            one = text.select([b])
            k = len(word_positions(one, 0))
            fn = presence_text_fn(self.adapter, one, _image_emb(self.adapter, pixels, b))
            attr = self._shap(fn, torch.ones(1, k, device=pixels.device), None, k, seeds[b])
            out.append(words_to_scores(one, 0, attr[0]))
        return torch.stack(out)
