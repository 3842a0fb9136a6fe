"""The per-pair variational information bottleneck of M2IB (Wang et al. 2023, Sec. 3.2, after IBA, Schulz et
al. 2020, Sec. 3.1) and its four noise estimators.

For a hidden state R (tokens x channels) of one modality, a learnable alpha gives lambda = sigmoid(alpha).
Every estimator is one affine standardisation r = (R - m) / s (m, s broadcast over R) and a noise variance v
in those standardised units:

    z = lambda * r + (1 - lambda) * sqrt(v) * eps,   eps ~ N(0, 1),    Z = z * s + m            (B1)
    KL( N(lambda r, (1 - lambda)^2 v) || N(0, v) )
        = 0.5 * ((1 - lambda)^2 + (lambda r)^2 / v - 1 - log (1 - lambda)^2)                     (B2)

(B1) is IBA's Z = lambda R + (1 - lambda) epsilon with epsilon ~ N(m, v s^2); (B2) is its capacity: the KL of
p(z | r) from the prior q(z), the noise distribution (the KL is invariant under the common affine map).
The compression term is the MEAN of (B2) over the pair's real elements, the fitting term the cosine of the
bottlenecked embedding with the other modality's clean embedding, loss = beta * compression - fitting
(M2IB Sec. 3.2: variational bounds on I(Z; R) and I(Z; Y)). The map is (B2) summed over channels.
(B1), (B2) are labels of this module: they restate IBA Sec. 3.1 (Z, the information loss L_I, the prior
Q(Z) = N(mu_R, sigma_R^2)) in the standardised form IBA's own code computes its capacity in.

- "release" (default; the published tables): m = 0, s = 1, v = 1. What YingWANGG/M2IB computes: its
  `get_compression_estimator` builds an estimator with mean 0 and std sqrt(var), and its bottleneck never
  reads them, so `var` has no effect (DESIGN.md, quirks).
- "paper": m = 0, s = sqrt(var), v = 1: the release's estimator as it would act if the bottleneck used it
  the way IBA's does (activations divided by sqrt(var), noise and prior N(0, 1) in those units, i.e. noise
  N(0, var) on the raw activations), so var is the paper's sigma^2 and its grid over (beta, sigma^2) means
  something. With var = 1 every operation is exact (x / 1, x * 1 + 0), so it equals "release" bit for bit.
- "normalized": m, s the per-channel mean and std of the pair's OWN hidden state pooled over its real
  positions (image: every token including the class token; text: start .. end-of-text), s floored at
  1e-6; v = var. Not IBA: the statistics come from the explained input itself, so they are not those of
  a data set and differ from pair to pair. Its image maps agree with "iba"'s at mean rank correlation
  0.91 (0.90 for "release"), below the 0.99 of "iba" with itself under other noise (embedded test pairs
  0-99, scripts/compare_m2ib_estimators.py; earlier measurements on other models gave 0.91-0.93 against a
  0.95 ceiling). For a one-word caption (SOT, word, EOT: three positions) no standardised value can exceed
  sqrt(2) in magnitude (n values standardised by their own population std are bounded by sqrt(n - 1)).
- "iba": IBA's per-sample bottleneck estimator: m, s the per-element (position x channel) mean and std of
  the layer over a data set, streamed with Welford's algorithm and cached once per model, layer and data
  (m2ib/method/stats.py: positions, the std floor 0.01 = IBA's min_std, cache key), v = var (IBA: v = 1,
  noise and prior N(mu_R, sigma_R^2)). Open choices, fixed here: no Gaussian smoothing of lambda (IBA smooths it over the
  feature map with sigma = 1; M2IB does not smooth), no active-neuron mask (stats.py), text positions by
  index (stats.py).

Several layers (`layers` / image_layers / text_layers), after CoIBA (Hong, Kim, Jeon, Lee, CVPR 2025,
"Comprehensive Information Bottleneck for Unveiling Universal Attribution to Interpret Vision Transformers",
arXiv 2507.04388): one damping ratio lambda shared by bottlenecks after blocks l_1 < ... < l_K. With
f_{a->b} the blocks a+1..b (adapter.run_blocks) and (m_k, s_k, v_k) layer l_k's estimator,

    Z_1 = (B1) on R_1 = prefix(l_1);  Z_k = (B1) with (m_k, s_k, v_k) on R~_k = f_{l_{k-1} -> l_k}(Z_{k-1});
    embedding = suffix(Z_K);  loss = beta * mean (B2)(lambda, r_1) - fitting                          (B3)

so every layer's noise enters the forward in turn, fresh per layer and copy (drawn from the pair's
generator layer after layer, so one listed layer draws exactly what single-layer M2IB draws and equals it
bit for bit). Facts read in the authors' code (IBA/coiba.py of their release): lambda = sigmoid(alpha) is
one tensor used at every targeted layer, each layer's noise uses that layer's own mean and std, and the
information term is the KL at the FIRST targeted layer only (its clean activation and its estimator),
which is also the map. Our reading of the paper's "upper bounding layer-wise information": each later
Z_k is a noisy function of Z_1 (a Markov chain R_1 -> Z_1 -> Z_k), so I(R_1; Z_k) <= I(R_1; Z_1), which
the first layer's KL bounds. Open choices, fixed here:
- lambda's shape: `ratio` "token_channel" (default; M2IB's alpha per token and channel, so one listed
  layer is single-layer M2IB) or "token" (CoIBA's ViT code: one alpha per token, shared by the channels).
  Both need the same hidden shape at every listed layer (true for the transformer towers here; else
  refused). With "token" the map is still (B2) summed over channels.
- the compression term and the map are the first listed layer's (CoIBA's code), not a sum or mean of
  per-layer KLs; `beta` keeps its single-layer meaning.
- estimators per layer: "normalized" standardises each layer with the statistics of its CLEAN hidden
  state (the noise-free forward), "iba" with that layer's data-set statistics, "paper"/"release" as above.
- CoIBA bottlenecks the output of timm's norm1 (or norm2) in blocks 4..12 (its defaults) of an image
  classifier, optionally sparing the class token; here the bottlenecks sit on block outputs (M2IB's place)
  on every real token of either tower, and the fitting term is M2IB's cosine with the other modality.
Measured (embedded test pairs 0-99, release mode, run seeds 0 and 1, scripts/compare_m2ib_estimators.py
--extra): image_layers [0, 1] or [0, 1, 2] with text_layers [0, 1] against the default single layer 0 keep
the image IoU (0.47-0.48 vs 0.47) but lower pointing (0.71-0.75 vs 0.77) and text AP (0.70-0.71 vs
0.77-0.78) and raise both confidence drops (image 6.3-6.6 vs 6.1-6.3, text 14.7-15.2 vs 12.1-13.1); the
per-token ratio moves maps far more than the extra layers (image rank correlation to "iba" 0.55-0.58 vs
0.89-0.90). The cost per pair grows by ~20% (the blocks run per step are those after the first layer
either way; the extra noise draws and one clean pass remain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from collections.abc import Sequence
from typing import Optional

import torch

from m2ib.core.errors import InputError, UnsupportedError
from m2ib.method.stats import LayerStats, check_stats_config

MODES = ("release", "paper", "normalized", "iba")
RATIOS = ("token_channel", "token")
#: Keys added after the first published tables, left out of as_flat() at these defaults so that the
#: identities (cache keys) of single-layer, per-channel runs stay as they were.
LATER_KEYS = {"layers": None, "ratio": "token_channel"}


@dataclass(frozen=True)
class ModalityConfig:
    """Hyperparameters of one modality's bottleneck (defaults: the release's). layer and beta None mean
    "the model's own" (ModelAdapter.default_m2ib_settings), filled in by with_model_defaults."""

    layer: Optional[int] = None
    beta: Optional[float] = None
    layers: Optional[tuple] = None   # multi-layer bottleneck (module docstring, (B3)); None: `layer` alone
    var: float = 1.0
    steps: int = 10
    copies: int = 10
    lr: float = 1.0
    init_alpha: float = 5.0
    ratio: str = "token_channel"     # lambda's shape: "token_channel" (M2IB) or "token" (CoIBA's ViT code)

    def validate(self, modality: str) -> "ModalityConfig":
        def bad(msg):
            raise InputError(f"m2ib {modality}: {msg}")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.type.startswith("Optional"):
                continue
            if "int" in f.type and (isinstance(value, bool) or not isinstance(value, int)):
                bad(f"{f.name} must be an integer, got {value!r}")
            if "float" in f.type and (isinstance(value, bool) or not isinstance(value, (int, float))):
                bad(f"{f.name} must be a number, got {value!r}")
            if "float" in f.type and not math.isfinite(value):
                bad(f"{f.name} must be finite, got {value!r}")
        if self.layers is not None:
            self._check_layers(bad)
        if self.ratio not in RATIOS:
            bad(f"ratio must be one of {RATIOS}, got {self.ratio!r}")
        if self.beta is not None and self.beta < 0:
            bad(f"beta must be >= 0, got {self.beta}")
        if not self.var > 0:
            bad(f"var must be > 0, got {self.var}")
        if self.steps < 1 or self.copies < 1:
            bad(f"steps and copies must be >= 1, got steps={self.steps}, copies={self.copies}")
        if not self.lr > 0:
            bad(f"lr must be > 0, got {self.lr}")
        return self

    def _check_layers(self, bad) -> None:
        """`layers`: a non-empty, strictly increasing list of block indices, stored as a tuple; `layer`
        becomes its first entry (the layer whose capacity makes the map) and may only be given equal to it."""
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            bad(f"layers must be a list of block indices such as [3, 5, 7], got {layers!r}")
        layers = tuple(layers)
        if not layers:
            bad("layers must not be empty (leave it null for the single `layer`)")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in layers):
            bad(f"layers must be non-negative integers, got {list(layers)!r}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            bad(f"layers must be strictly increasing (the blocks' order), got {list(layers)}")
        if self.layer is not None and self.layer != layers[0]:
            bad(f"layer {self.layer} conflicts with layers {list(layers)}: the map is read at the first "
                f"listed layer; give only layers (or layer equal to its first entry)")
        object.__setattr__(self, "layers", tuple(int(v) for v in layers))
        object.__setattr__(self, "layer", int(layers[0]))

    @property
    def bottleneck_layers(self) -> tuple:
        """The blocks after which noise is injected, in order: `layers`, else (`layer`,)."""
        return self.layers if self.layers is not None else (self.layer,)


DEFAULT_STATS = {"kind": "embedded", "split": "val", "limit": 500}


@dataclass(frozen=True)
class M2IBConfig:
    """Both modalities' hyperparameters plus the estimator mode (see module docstring)."""

    image: ModalityConfig = field(default_factory=ModalityConfig)
    text: ModalityConfig = field(default_factory=ModalityConfig)
    mode: str = "release"
    amp: bool = False   # bf16 autocast of the encoder suffix on the pair's device (CUDA, or a CPU with bf16)
    # mode "iba": the data config its statistics are estimated on (stats.py); the default is the embedded
    # benchmark's val split, which any model can read (for a real model, its own data is the better choice)
    stats: Optional[dict] = field(default_factory=lambda: dict(DEFAULT_STATS))

    @classmethod
    def from_kwargs(cls, **kw) -> "M2IBConfig":
        """Flat keyword form: layer=9 sets both modalities, image_layer=9 / text_beta=1 set one."""
        names = {f.name for f in fields(ModalityConfig)}
        image, text, top = {}, {}, {}
        for key, value in kw.items():
            if key in names:
                image[key] = text[key] = value
            elif key.startswith("image_") and key[6:] in names:
                image[key[6:]] = value
            elif key.startswith("text_") and key[5:] in names:
                text[key[5:]] = value
            elif key in ("mode", "amp", "stats"):
                top[key] = value
            else:
                raise InputError(f"unknown M2IB hyperparameter {key!r}; use one of {sorted(names)} "
                                 f"(optionally prefixed image_/text_), mode, amp, stats")
        cfg = cls(ModalityConfig(**image), ModalityConfig(**text), **top)
        return cfg.validate()

    def validate(self) -> "M2IBConfig":
        if not isinstance(self.image, ModalityConfig) or not isinstance(self.text, ModalityConfig):
            raise InputError("M2IBConfig.image and .text must be ModalityConfig instances")
        if self.mode not in MODES:
            raise InputError(f"m2ib mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "iba" and self.stats is None:
            raise InputError("m2ib mode 'iba' needs stats: the data config its layer statistics are estimated "
                             "on, e.g. stats={kind: embedded, split: val, limit: 500}")
        if self.stats is not None:
            object.__setattr__(self, "stats", check_stats_config(self.stats))
        self.image.validate("image")
        self.text.validate("text")
        return self

    def for_modality(self, modality: str) -> ModalityConfig:
        return self.image if modality == "image" else self.text

    def with_model_defaults(self, settings: dict) -> "M2IBConfig":
        """Layers and betas left None taken from a model's M2IB settings (image_/text_ layer and beta)."""
        def fill(m, hp):
            return replace(hp, **{k: settings[f"{m}_{k}"] for k in ("layer", "beta") if getattr(hp, k) is None})
        return replace(self, image=fill("image", self.image), text=fill("text", self.text)).validate()

    def as_flat(self) -> dict:
        """The flat keyword form (image_layer=..., text_beta=..., mode, amp; stats in mode "iba" only, the one
        mode that reads it; LATER_KEYS only where they differ from their defaults):
        what caches and tables record."""
        out = {f"{m}_{f.name}": getattr(self.for_modality(m), f.name) for m in ("image", "text")
               for f in fields(ModalityConfig)
               if f.name not in LATER_KEYS or getattr(self.for_modality(m), f.name) != LATER_KEYS[f.name]}
        out = {**out, "mode": self.mode, "amp": self.amp}
        return {**out, "stats": self.stats} if self.mode == "iba" else out


def capacity(lam: torch.Tensor, r: torch.Tensor, noise_var: float = 1.0) -> torch.Tensor:
    """Elementwise (B2): KL( N(lam r, (1-lam)^2 v) || N(0, v) ), v = noise_var."""
    var = (1 - lam) ** 2
    return -0.5 * (1 + torch.log(var) - (lam * r) ** 2 / noise_var - var)


def standardise(hidden: torch.Tensor, valid: torch.Tensor):
    """Per-pair, per-channel mean and sd of hidden (B, N, C) over positions where valid (B, N)."""
    w = valid[..., None].to(hidden.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1)
    mean = (hidden * w).sum(1, keepdim=True) / n
    sd = (((hidden - mean) ** 2 * w).sum(1, keepdim=True) / n).sqrt().clamp_min(1e-6)
    return mean, sd


def estimator(mode: str, hidden: torch.Tensor, valid: torch.Tensor, var: float, stats: Optional[LayerStats]):
    """(m, s, v) of (B1)-(B2) for a mode (module docstring): m and s broadcast against hidden (B, N, C) and
    are None in "release" (r = R exactly)."""
    if mode == "release":
        return None, None, 1.0
    if mode == "paper":
        return hidden.new_zeros((1, 1, 1)), hidden.new_full((1, 1, 1), math.sqrt(var)), 1.0
    if mode == "normalized":
        return (*standardise(hidden, valid), float(var))
    if stats is None:
        raise InputError("m2ib mode 'iba' needs the layer statistics (M2IBAttributor estimates them in setup)")
    return (*stats.for_positions(hidden.shape[1], hidden.device), float(var))


def pair_generators(seeds, modality: str, device) -> list[torch.Generator]:
    """One noise generator per pair, seeded from the pair's seed and the modality, so a pair's noise
    does not depend on its batch."""
    offset = 0 if modality == "image" else 1
    return [torch.Generator(device=device).manual_seed(2 * int(s) + offset) for s in seeds]


def draw_noise(generators, copies: int, lengths, shape_nc, device, dtype=torch.float32) -> torch.Tensor:
    """(B, copies, N, C) standard normal noise; pair i draws (copies, lengths[i], C) from its own
    generator (zeros after its length), so the draw matches a one-pair run exactly."""
    N, C = shape_nc
    out = torch.zeros(len(generators), copies, N, C, device=device, dtype=dtype)
    for i, (g, n) in enumerate(zip(generators, lengths)):
        out[i, :, :n] = torch.randn(copies, n, C, generator=g, device=device, dtype=dtype)
    return out


@dataclass
class BottleneckResult:
    capacity: torch.Tensor          # (B, N) capacity of the last forward, summed over channels, 0 where invalid
    fitting: torch.Tensor           # (B,) mean cosine of the last forward
    compression: torch.Tensor       # (B,) mean capacity of the last forward


def fit_bottleneck(adapter, modality: str, inputs, target: torch.Tensor, hp: ModalityConfig, mode: str,
                   seeds, amp: bool = False, stats: Optional[dict] = None,
                   hidden: Optional[torch.Tensor] = None) -> BottleneckResult:
    """Optimise one bottleneck per pair for `hp.steps` Adam steps and return its capacity map.

    The prefix up to the first bottleneck layer and the other modality's embedding `target` (B, D) are
    constants of the pair, computed once; only alpha gets gradients (weights are frozen); all pairs of the
    batch are optimised together with independent parameters (their losses are summed, Adam is
    elementwise). With several layers (hp.layers, (B3)) the same lambda injects noise after each of them in
    turn, the blocks between them run on the noisy state (adapter.run_blocks), and compression and map are
    those of the first layer. `stats`: {layer: LayerStats} (mode "iba" only, m2ib.method.stats.layer_stats).
    `hidden`: adapter.prefix(modality, inputs, first layer) when the caller already has it (its clean encode).
    """
    layers = [adapter.check_layer(modality, l) for l in hp.bottleneck_layers]
    with torch.no_grad():
        hidden = (adapter.prefix(modality, inputs, layers[0]) if hidden is None else hidden).float()
        finite = torch.isfinite(hidden).flatten(1).all(1)
        if not finite.all():
            raise InputError(f"non-finite {modality} activations at layer {layers[0]} for batch rows "
                             f"{(~finite).nonzero().flatten().tolist()}")
        valid = adapter.token_positions(modality, inputs)[:, : hidden.shape[1]]
        clean = [hidden]          # the clean state at each bottleneck layer: its estimator's input
        for start, stop in zip(layers, layers[1:]):
            clean.append(adapter.run_blocks(modality, clean[-1], inputs, start, stop).float())
    B, N, C = hidden.shape
    if any(h.shape != hidden.shape for h in clean):
        raise UnsupportedError(f"m2ib {modality} layers {layers}: the hidden states differ in shape "
                         f"({[tuple(h.shape) for h in clean]}); one damping ratio cannot be shared")
    estimators = [estimator(mode, h, valid, hp.var, (stats or {}).get(l)) for h, l in zip(clean, layers)]
    mean, sd, noise_var = estimators[0]
    r = hidden if mean is None else (hidden - mean) / sd
    lengths = valid.sum(1).tolist()
    generators = pair_generators(seeds, modality, hidden.device)
    width = C if hp.ratio == "token_channel" else 1
    alpha = torch.full((B, N, width), float(hp.init_alpha), device=hidden.device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=hp.lr)
    target_rep = target.detach().float().repeat_interleave(hp.copies, 0)
    for _ in range(hp.steps):
        lam = torch.sigmoid(alpha)
        kl = capacity(lam, r, noise_var) * valid[..., None].float()
        z = _inject(lam, r[:, None], valid, estimators[0], generators, hp.copies, lengths)
        # the adapter's form for many passes under autograd (open_clip: written-out blocks, ~1.25x on the CPU)
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=amp), adapter.optimising():
            for (start, stop), (m, s, v) in zip(zip(layers, layers[1:]), estimators[1:]):
                h = adapter.run_blocks(modality, z, inputs, start, stop).float().reshape(B, hp.copies, N, C)
                r_next = h if m is None else (h - m[:, None]) / s[:, None]
                z = _inject(lam, r_next, valid, (m, s, v), generators, hp.copies, lengths)
            emb = adapter.suffix(modality, z, inputs, layers[-1])
        compression, fitting = loss_terms(emb, target_rep, kl, valid, hp.copies)
        loss = (hp.beta * compression - fitting).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return BottleneckResult(kl.detach().sum(-1), fitting.detach(), compression.detach())


def loss_terms(emb, target_rep, kl, valid, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M2IB's two terms per pair, (compression (B,), fitting (B,)): compression = the MEAN capacity over the
    pair's real elements (kl (B, N, C), zero elsewhere); fitting = the cosine of the bottlenecked embeddings
    emb (B * copies, D) with the other modality's (target_rep, repeated per copy), averaged over the copies."""
    fitting = (emb.float() * target_rep).sum(-1).reshape(-1, copies).mean(1)
    compression = kl.sum((1, 2)) / (valid.sum(1).float() * kl.shape[-1])
    return compression, fitting


def _inject(lam, r, valid, est, generators, copies: int, lengths) -> torch.Tensor:
    """(B1) on standardised states r (B, copies or 1, N, C) with lam (B, N, C or 1): fresh noise for each copy
    from the pairs' generators, real positions only; back to raw units, (B * copies, N, C)."""
    mean, sd, noise_var = est
    B, _, N, C = r.shape
    eps = draw_noise(generators, copies, lengths, (N, C), r.device)
    z = lam[:, None] * r + ((1 - lam) * noise_var ** 0.5)[:, None] * eps
    z = torch.where(valid[:, None, :, None], z, r)
    if mean is not None:
        z = z * sd[:, None] + mean[:, None]
    return z.reshape(B * copies, N, C)
