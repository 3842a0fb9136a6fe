"""IBA's feature statistics: the mean and standard deviation of each element (position x channel) of the
hidden state after block l, estimated over a data set (Schulz et al. 2020, Sec. 3.1: the noise and the
prior Q(Z) are N(mu_R, sigma_R^2) with mu_R, sigma_R the per-element mean and std of R over the data).

- Estimator: Welford's running update, one sample at a time in the data's order, in float64, as IBA's
  TorchWelfordEstimator does; std = sqrt(M2 / (n - 1)) (unbiased, as IBA), floored at MIN_STD (IBA's
  `min_std`, applied by IBA when it analyses a sample).
- Positions: image tokens are fixed (class token + patch grid), so every element has n = number of
  images. Captions have different lengths: position t (0 = start-of-text) is counted over the captions
  whose start..end-of-text covers t, so the end-of-text token sits at a different t in different captions
  and position t mixes word and end-of-text tokens (the position embedding, not the word, is what a
  position shares across captions). Positions seen fewer than MIN_POSITION_COUNT times (long captions)
  use the per-channel statistics pooled over every counted position instead (Chan et al.'s exact merge
  of the per-position estimates). Padding after end-of-text is never counted.
- Cache: one file per (model weights, modality, layer, data config), under $M2IB_CACHE/layer-stats (the
  attribution cache's root, default .cache/attributions). The weights are identified by a hash of their
  values, so a fine-tuned or randomised copy (ROAR+, sanity checks) gets its own statistics.
- Omitted: IBA's "active neurons" mask (elements that are zero on <1% of the data get no capacity and
  output 0); it exists for post-ReLU feature maps, and a transformer's residual stream has no such zeros.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from m2ib.core.errors import InputError
from m2ib.core.progress import progress_bar
from m2ib.data.registry import load_dataset, loader_params

MIN_STD = 0.01              # IBA's default min_std
MIN_POSITION_COUNT = 10     # fewer observations of a text position: use the pooled per-channel statistics
BATCH_SIZE = 32             # prefix batches of the statistics pass (fixed: part of what the numbers depend on)
STATS_VERSION = 1           # bump when the estimator changes, so old cache files are not reused


def check_stats_config(stats) -> dict:
    """The statistics' data config as a plain dict (a data config: kind, the loader's keys such as split
    and limit), after the data registry's checks; no model or data is touched."""
    if not isinstance(stats, Mapping):
        raise InputError(f"m2ib stats must be a data config mapping such as {{kind: embedded, split: val, "
                         f"limit: 500}}, got {stats!r}")
    stats = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(stats).items()}
    if "kind" not in stats:
        raise InputError(f"m2ib stats needs a data set kind (stats.kind), got {stats!r}")
    loader_params(stats)
    return stats


@dataclass
class LayerStats:
    """Welford estimates of one layer's hidden state: per position (N, C) and pooled per channel (C,)."""

    count: torch.Tensor         # (N,) observations per position (float64)
    mean: torch.Tensor          # (N, C) float64
    m2: torch.Tensor            # (N, C) float64, sum of squared deviations

    def std(self) -> torch.Tensor:
        """(N, C) unbiased std, unfloored; NaN where a position has fewer than two observations."""
        return (self.m2 / (self.count[:, None] - 1)).sqrt()

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (C,), unbiased std (C,)) over every counted position: the exact merge of the positions'
        estimates, sum M2_t + sum n_t (mean_t - mean)^2."""
        n = self.count.sum()
        mean = (self.count[:, None] * self.mean).sum(0) / n
        m2 = self.m2.sum(0) + (self.count[:, None] * (self.mean - mean) ** 2).sum(0)
        return mean, (m2 / (n - 1)).sqrt()

    def for_positions(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of shape (1, n, C), float32 on `device`: per position where it was seen at least
        MIN_POSITION_COUNT times, the pooled values elsewhere (and beyond the longest sequence seen);
        std floored at MIN_STD."""
        pooled_mean, pooled_std = self.pooled()
        C = self.mean.shape[1]
        mean, std = pooled_mean.expand(n, C).clone(), pooled_std.expand(n, C).clone()
        k = min(n, self.mean.shape[0])
        own = self.count[:k] >= MIN_POSITION_COUNT
        mean[:k][own], std[:k][own] = self.mean[:k][own], self.std()[:k][own]
        return (mean[None].float().to(device), std.clamp_min(MIN_STD)[None].float().to(device))

    def to_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


class Welford:
    """Welford's running mean and M2, one sample at a time, each position counted where it is valid."""

    def __init__(self):
        self.count = self.mean = self.m2 = None

    def _grow(self, n: int, c: int, device) -> None:
        old = 0 if self.count is None else self.count.shape[0]
        if n <= old:
            return
        pad = lambda t, shape: torch.cat([t, torch.zeros(shape, dtype=torch.float64, device=device)]) \
            if t is not None else torch.zeros(shape, dtype=torch.float64, device=device)
        self.count, self.mean, self.m2 = pad(self.count, (n - old,)), pad(self.mean, (n - old, c)), \
            pad(self.m2, (n - old, c))

    def update(self, hidden: torch.Tensor, valid: torch.Tensor) -> None:
        """hidden (B, N, C), valid (B, N) bool: add each row's valid positions, in row order."""
        self._grow(hidden.shape[1], hidden.shape[2], hidden.device)
        N = hidden.shape[1]
        for x, v in zip(hidden.double(), valid):
            w = v[:, None]
            count = self.count[:N] + v.double()
            delta = x - self.mean[:N]
            mean = torch.where(w, self.mean[:N] + delta / count.clamp_min(1)[:, None], self.mean[:N])
            self.m2[:N] = torch.where(w, self.m2[:N] + delta * (x - mean), self.m2[:N])
            self.mean[:N], self.count[:N] = mean, count

    def result(self) -> LayerStats:
        if self.count is None:
            raise InputError("no activations to estimate statistics from")
        return LayerStats(self.count.cpu(), self.mean.cpu(), self.m2.cpu())


def estimate_stats(adapter, modality: str, layer: int, samples, progress: bool = True) -> LayerStats:
    """One pass over `samples` (in order, batches of BATCH_SIZE): Welford statistics of the hidden state
    after block `layer` over its real positions (adapter.token_positions)."""
    if len(samples) < 2:
        raise InputError(f"m2ib stats need at least 2 samples, the stats data has {len(samples)}")
    acc = Welford()
    bar = progress_bar(total=len(samples), desc=f"layer statistics {modality}/{layer}", unit="pair",
                       enabled=progress)
    with torch.no_grad():
        for start in range(0, len(samples), BATCH_SIZE):
            chunk = samples[start:start + BATCH_SIZE]
            inputs = adapter.preprocess([s.image for s in chunk]) if modality == "image" \
                else adapter.tokenize([s.caption for s in chunk])
            hidden = adapter.prefix(modality, inputs, layer).float()
            acc.update(hidden, adapter.token_positions(modality, inputs)[:, :hidden.shape[1]])
            bar.update(len(chunk))
    bar.close()
    return acc.result()


def stats_cache_root() -> Path:
    return Path(os.environ.get("M2IB_CACHE", ".cache/attributions")) / "layer-stats"


def stats_key(weights: str, modality: str, layer: int, data: dict) -> str:
    payload = {"weights": weights, "modality": modality, "layer": int(layer), "data": data,
               "version": STATS_VERSION, "batch_size": BATCH_SIZE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def layer_stats(adapter, modality: str, layer: int, data: dict, progress: bool = True,
                root: Path | None = None) -> LayerStats:
    """The statistics of (model weights, modality, layer, data config), from the cache or computed once
    and cached (written atomically, with a readable .json of what the key stands for)."""
    data = check_stats_config(data)
    root = Path(root) if root is not None else stats_cache_root()
    key = stats_key(adapter.weights_digest(), modality, layer, data)
    path = root / f"{modality}-layer{layer}-{key}.pt"
    if path.is_file():
        return LayerStats(**torch.load(path, map_location="cpu", weights_only=True))
    samples = load_dataset(data, progress=progress)
    stats = estimate_stats(adapter, modality, layer, samples, progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(stats.to_dict(), tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"model": adapter.name, "modality": modality, "layer": layer,
                                                     "data": data, "n": len(samples)}, indent=1, default=str))
    return stats
