"""The readout bottleneck for vision-language models: M2IB's bottleneck with alpha PREDICTED by a small
network trained once per model, so an attribution costs one forward pass instead of per-pair optimisation.

Source: IBA's Readout Bottleneck (Schulz et al., ICLR 2020, Sec. 3.2; facts on the release,
BioroboticsLab/IBA `pytorch_readout.py`, read by us): a first pass without noise records feature maps
of several layers; they are brought to the bottleneck's resolution, concatenated and mapped by three
1x1 convolutions with ReLU (widths in -> in/2 -> 2C -> C) to alpha per position and channel; the last
layer starts at weight * 1e-3 and bias 5 (alpha ~ the per-sample initial value); the bottleneck with that
alpha is trained over a data set with the per-sample objective. Here, per modality (Wang et al. 2023):

    x_t   = [LN(h_l1[t]), ..., LN(h_lk[t]), e, (P LN(h_lk[t])) * e]          (per token t)
    alpha = W3 relu(W2 relu(W1 x_t + b1) + b2) + b3,  lambda = sigmoid(alpha)
    Z     = lambda R + (1 - lambda) eps,  eps ~ N(0, 1)                       (M2IB Eq. 3, release noise)
    loss  = mean over pairs of  beta * mean_elements KL(lambda) - cos(f(Z), e)  (M2IB Eq. 4 and 5)

h_l: the explained tower's hidden states after blocks l1..lk, R: the one after the M2IB layer, all from
one pass (hidden_states; a ViT's tokens all have the bottleneck's resolution, so nothing is resized);
e: the OTHER modality's clean normalised embedding, which is both the fitting target (as in M2IB) and the
conditioning that makes alpha pair-specific (IBA's release likewise broadcasts the readouts of fully
connected layers over all positions); KL, the capacity, is bottleneck.capacity with
the release estimator (raw activations, unit noise). The map is the capacity of the predicted lambda
summed over channels, rendered and normalised exactly as per-sample M2IB's
(ModelAdapter.hidden_to_image_map + core.maps.normalise_minmax; hidden_to_text_scores).

Choices the papers leave open, made here:
- which layers are read: default the M2IB layer up to the tower's last valid bottleneck layer
  (ModelAdapter.check_layer); prefix() cannot return the last block's output;
- input standardisation: a parameter-free layer norm per token and layer (IBA standardises each
  element with data-set statistics; a per-token norm needs no estimation pass and fits any length);
- the conditioning: e broadcast to every token plus its elementwise product with a learnt projection
  P of the deepest read layer into the joint space (a bilinear token-caption term, which ReLU layers on
  a concatenation could only approximate);
- alpha per token and channel (as IBA) or per token, per modality (image_alpha, text_alpha); defaults
  chosen on the embedded model (scripts/bench_readout.py): channel for images, token for text;
- training: Adam, one noise draw per pair and step from a seeded generator (no copies), minibatches
  in a seeded random order, inputs recomputed from the frozen model at every step (nothing stored);
- inference uses no noise: the map is a deterministic function of the pair, so `seeds` are unused.
Release estimator only (M2IB's `mode: release`); `var` has no role there.

Trained readouts are cached by model weights + every setting above + the training code under
$M2IB_READOUT_CACHE (default: the checkout's .cache/readout, or ~/.cache/m2ib-bench/readout for an
installed copy). `make readout` (scripts/train_readout.py) trains the missing ones (a progress bar and one
log line each; a cache hit never retrains; --retrain forces); the Attributor only loads them and refuses a
missing one in one line saying so: training takes minutes and a training split, which an attribution call
should never start silently.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from m2ib.core.attributor import MODALITIES, Attributor, register_method
from m2ib.core.errors import InputError, UnsupportedError
from m2ib.core.maps import normalise_minmax
from m2ib.core.paths import source_checkout, user_cache_dir
from m2ib.core.progress import progress_bar
from m2ib.core.records import TextBatch
from m2ib.core.seeds import generator
from m2ib.method.bottleneck import capacity, loss_terms

log = logging.getLogger(__name__)
ALPHA_KINDS = ("channel", "token")


def cache_root() -> Path:
    """$M2IB_READOUT_CACHE, else the checkout's .cache/readout, else the user cache (installed copy)."""
    checkout = source_checkout()
    default = checkout / ".cache" / "readout" if checkout is not None else user_cache_dir("readout")
    return Path(os.environ.get("M2IB_READOUT_CACHE", default))


@dataclass(frozen=True)
class ReadoutSpec:
    """Everything that determines one modality's trained readout (its cache key, with the model)."""

    modality: str
    layer: int                  # the M2IB bottleneck layer
    beta: float
    read_layers: tuple          # hidden states the network reads
    alpha: str                  # ALPHA_KINDS
    init_alpha: float
    train_data: str
    train_split: str
    train_pairs: int
    epochs: int
    batch_size: int
    lr: float
    train_seed: int

    def key(self, adapter) -> str:
        """Hash of the model's weights and identity, this spec and the code that trains (training_code)."""
        h = hashlib.sha256()
        source = getattr(adapter, "source", None)
        h.update(repr(source.identity() if source is not None else adapter.name).encode())
        h.update(adapter.weights_digest().encode())
        h.update(repr(sorted(asdict(self).items())).encode())
        for fn in training_code():
            h.update(inspect.getsource(fn).encode())
        return h.hexdigest()[:16]

    def path(self, adapter, root: Optional[Path] = None) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", adapter.name)
        return Path(root or cache_root()) / f"{safe}-{self.modality}-{self.key(adapter)}.pt"


class ReadoutNet(nn.Module):
    """Per-token alpha from the read hidden states and the other modality's embedding (module docstring)."""

    def __init__(self, n_read: int, width: int, embed_dim: int, per_channel: bool, init_alpha: float):
        super().__init__()
        d_in = n_read * width + 2 * embed_dim
        self.project = nn.Linear(width, embed_dim, bias=False)
        self.layers = nn.Sequential(nn.Linear(d_in, d_in // 2), nn.ReLU(), nn.Linear(d_in // 2, 2 * width),
                                    nn.ReLU(), nn.Linear(2 * width, width if per_channel else 1))
        with torch.no_grad():
            self.layers[-1].weight.mul_(1e-3)
            self.layers[-1].bias.fill_(init_alpha)

    def forward(self, reads: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """reads (B, N, k, C), cond (B, D) -> alpha (B, N, C or 1)."""
        x = F.layer_norm(reads, reads.shape[-1:])
        c = cond[:, None].expand(-1, x.shape[1], -1)
        pair = self.project(x[:, :, -1]) * c
        return self.layers(torch.cat([x.flatten(2), c, pair], -1))


def build_net(adapter, spec: ReadoutSpec) -> ReadoutNet:
    """A freshly initialised net, drawn from spec.train_seed without touching the global RNG."""
    width = adapter.prefix(spec.modality, _probe(adapter, spec.modality), spec.layer).shape[-1]
    embed_dim = adapter.encode(_other(spec.modality), _probe(adapter, _other(spec.modality))).shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train_seed)
        net = ReadoutNet(len(spec.read_layers), width, embed_dim, spec.alpha == "channel", spec.init_alpha)
    return net.to(adapter.device)


def _other(modality: str) -> str:
    return "text" if modality == "image" else "image"


def _probe(adapter, modality: str):
    if modality == "image":
        return torch.zeros(1, 3, *adapter.image_size, device=adapter.device)
    return adapter.tokenize(["a"])


# ---- the bottleneck for a given lambda ----------------------------------------------------------------------
@dataclass
class Features:
    """One batch's constants for one modality: read states, R, valid positions, the other embedding."""

    reads: torch.Tensor         # (B, N, k, C)
    hidden: torch.Tensor        # (B, N, C), R at the bottleneck layer
    valid: torch.Tensor         # (B, N) bool
    other: torch.Tensor         # (B, D), the other modality's clean embedding (target and conditioning)


def hidden_states(adapter, modality: str, inputs, layers) -> dict[int, torch.Tensor]:
    """float32 hidden states after each of `layers`, from ONE pass up to the deepest where the adapter
    reports per-block outputs (record_attention parts: written-out attention, equal to prefix() to
    float32 rounding), else one prefix() per layer."""
    layers = sorted(set(layers))
    with torch.no_grad():
        if adapter.supports_attention_parts:
            try:
                with adapter.record_attention(modality, parts=True) as record:
                    adapter.prefix(modality, inputs, layers[-1])
                return {l: record.parts[l]["hidden"].float() for l in layers}
            except UnsupportedError:
                pass        # this tower reports no blocks (e.g. a ResNet image tower): one prefix() per layer
        return {l: adapter.prefix(modality, inputs, l).float() for l in layers}


def features(adapter, spec: ReadoutSpec, inputs, other_embedding: torch.Tensor, states=None) -> Features:
    """The batch's Features; `states` (hidden_states of the spec's layers) when already computed."""
    states = states or hidden_states(adapter, spec.modality, inputs, {spec.layer, *spec.read_layers})
    hidden = states[spec.layer]
    if not torch.isfinite(hidden).all():
        bad = (~torch.isfinite(hidden).flatten(1).all(1)).nonzero().flatten().tolist()
        raise InputError(f"non-finite {spec.modality} activations at layer {spec.layer} for batch rows {bad}")
    valid = adapter.token_positions(spec.modality, inputs)[:, : hidden.shape[1]]
    reads = torch.stack([states[l] for l in spec.read_layers], 2)
    return Features(reads, hidden, valid, other_embedding.detach().float())


def lambdas(net: ReadoutNet, feats: Features) -> torch.Tensor:
    """lambda = sigmoid(alpha) (B, N, C), a per-token alpha broadcast over channels."""
    return torch.sigmoid(net(feats.reads, feats.other)).expand_as(feats.hidden)


def token_capacity(lam: torch.Tensor, feats: Features) -> torch.Tensor:
    """(B, N) capacity summed over channels, 0 at invalid positions: per-sample M2IB's map values."""
    return (capacity(lam, feats.hidden) * feats.valid[..., None]).sum(-1)


def objective(adapter, spec: ReadoutSpec, inputs, feats: Features, lam: torch.Tensor, noise: torch.Tensor):
    """(compression (B,), fitting (B,)) of M2IB's loss for lambda and noise (B, K, N, C): K noisy copies,
    Z kept clean at invalid positions, fitting = mean cosine over the copies (as fit_bottleneck)."""
    B, K, (N, C) = lam.shape[0], noise.shape[1], lam.shape[1:]
    r, valid = feats.hidden, feats.valid
    kl = capacity(lam, r) * valid[..., None]
    z = (lam * r)[:, None] + (1 - lam)[:, None] * noise
    z = torch.where(valid[:, None, :, None], z, r[:, None]).reshape(B * K, N, C)
    emb = adapter.suffix(spec.modality, z, inputs, spec.layer)
    return loss_terms(emb, feats.other.repeat_interleave(K, 0), kl, valid, K)


# ---- training and the cache ---------------------------------------------------------------------------------
def _batch_inputs(adapter, modality: str, samples):
    pixels = adapter.preprocess([s.image for s in samples])
    text = adapter.tokenize([s.caption for s in samples])
    with torch.no_grad():
        other = adapter.encode_text(text) if modality == "image" else adapter.encode_image(pixels)
    return (pixels if modality == "image" else text), other


def train_readout(adapter, spec: ReadoutSpec, samples, progress: bool = True) -> tuple[ReadoutNet, list[float]]:
    """Train one modality's readout on `samples` (the spec's train_data/train_split, first train_pairs:
    scripts/train_readout.py loads them); returns the net and each epoch's mean loss. Deterministic:
    seeded initialisation, order and noise."""
    samples = list(samples)
    if not samples:
        raise InputError("m2ib_readout: no training pairs")
    net = build_net(adapter, spec)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    g = generator(spec.train_seed)
    steps_per_epoch = -(-len(samples) // spec.batch_size)
    bar = progress_bar(total=spec.epochs * steps_per_epoch, desc=f"readout {spec.modality}", unit="step",
                       enabled=progress)
    history = []
    for _ in range(spec.epochs):
        order, total = torch.randperm(len(samples), generator=g).tolist(), 0.0
        for start in range(0, len(samples), spec.batch_size):
            batch = [samples[i] for i in order[start:start + spec.batch_size]]
            inputs, other = _batch_inputs(adapter, spec.modality, batch)
            feats = features(adapter, spec, inputs, other)
            lam = lambdas(net, feats)
            noise = torch.randn(lam.shape, generator=g).to(lam.device)[:, None]
            compression, fitting = objective(adapter, spec, inputs, feats, lam, noise)
            loss = (spec.beta * compression - fitting).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total += value * len(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
        history.append(total / len(samples))
    bar.close()
    return net.eval().requires_grad_(False), history


def train_and_cache(adapter, spec: ReadoutSpec, samples, root: Optional[Path] = None,
                    progress: bool = True) -> Path:
    """Train (train_readout) and write the readout to its cache file atomically; returns the path."""
    path = spec.path(adapter, root)
    log.info("m2ib_readout: training the %s readout of %s on %d pairs x %d epochs -> %s", spec.modality,
             adapter.name, len(samples), spec.epochs, path)
    net, history = train_readout(adapter, spec, samples, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state": net.state_dict(), "spec": asdict(spec), "loss_per_epoch": history}, tmp)
    os.replace(tmp, path)
    return path


def load_readout(adapter, spec: ReadoutSpec, path: Path, changed: str = "") -> ReadoutNet:
    """The cached readout at `path`, or a one-line refusal saying how to train it (`changed`: the
    settings that differ from the defaults, as key=value words)."""
    if not path.is_file():
        args = f' ARGS="{changed}"' if changed else ""
        raise InputError(f"m2ib_readout: no trained {spec.modality} readout for model {adapter.name} with these "
                         f"settings ({path}); train it with `make readout MODEL=<its conf/model name>{args}` "
                         f"(scripts/train_readout.py)")
    net = build_net(adapter, spec)
    net.load_state_dict(torch.load(path, map_location=adapter.device, weights_only=True)["state"])
    return net.eval().requires_grad_(False)


def training_code() -> tuple:
    """What a trained readout's weights depend on besides its spec: editing any of these retrains."""
    return (ReadoutNet, build_net, hidden_states, features, lambdas, objective, _batch_inputs, train_readout,
            capacity, loss_terms)


# ---- the Attributor -----------------------------------------------------------------------------------------
@register_method("m2ib_readout")
class ReadoutAttributor(Attributor):
    """Readout M2IB (IBA's readout bottleneck): alpha predicted in one pass by a network trained per model.

    Module docstring: the network and its training. Layers and betas left None are
    the model's M2IB settings; read layers left None run from the M2IB layer to the last valid layer.
    image: capacity summed over channels, class token dropped, bilinearly upsampled, min-max normalised;
    text: capacity per token (nats), SOT/EOT/padding zeroed; raw capacities in meta like M2IB's.
    A readout that is not trained yet is refused in one line (train it with `make readout`): training
    takes minutes and a training split, which an attribution call should not start silently."""

    fitted_to_weights = True
    defaults = {
        "image_layer": None, "text_layer": None, "image_beta": None, "text_beta": None,
        "image_read_layers": None, "text_read_layers": None,
        "image_alpha": "channel", "text_alpha": "token", "init_alpha": 5.0,
        "train_data": "embedded", "train_split": "train", "train_pairs": 3000, "epochs": 2, "batch_size": 32,
        "lr": 3e-3, "train_seed": 0,
    }

    @classmethod
    def check_values(cls, hp: dict) -> None:
        def bad(msg):
            raise InputError(f"m2ib_readout: {msg}")
        for key in ("image_layer", "text_layer"):
            if hp[key] is not None and (isinstance(hp[key], bool) or not isinstance(hp[key], int)):
                bad(f"{key} must be an integer or null, got {hp[key]!r}")
        for key in ("image_beta", "text_beta"):
            value = hp[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < float("inf")):
                bad(f"{key} must be a finite number >= 0 or null, got {value!r}")
        for key in ("image_read_layers", "text_read_layers"):
            value = hp[key]
            if value is not None and (not isinstance(value, (list, tuple)) or not value
                                      or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
                bad(f"{key} must be a non-empty list of integers or null, got {value!r}")
        for key in ("image_alpha", "text_alpha"):
            if hp[key] not in ALPHA_KINDS:
                bad(f"{key} must be one of {ALPHA_KINDS}, got {hp[key]!r}")
        for key in ("train_pairs", "epochs", "batch_size"):
            if hp[key] < 1:
                bad(f"{key} must be >= 1, got {hp[key]}")
        if not hp["lr"] > 0:
            bad(f"lr must be > 0, got {hp['lr']}")
        if hp["train_seed"] < 0:
            bad(f"train_seed must be >= 0, got {hp['train_seed']}")

    def setup(self) -> None:
        self.specs = readout_specs(self.adapter, self.hparams, self.modalities)
        self.paths = {m: s.path(self.adapter) for m, s in self.specs.items()}
        changed = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                           for k, v in self.hparams.items() if k in self.defaults and v != self.defaults[k])
        self.nets = {m: load_readout(self.adapter, s, self.paths[m], changed) for m, s in self.specs.items()}

    def identity(self) -> dict:
        return {**super().identity(), **{f"{m}_readout": p.name for m, p in self.paths.items()}}

    def pair_features(self, pixels: torch.Tensor, text: TextBatch) -> tuple[dict, dict]:
        """(Features per explained modality, clean embedding per modality). An explained tower runs once,
        up to its deepest read layer and on from there to its embedding (suffix); the other is encoded."""
        inputs, states, emb = {"image": pixels, "text": text}, {}, {}
        with torch.no_grad():
            for m in MODALITIES:
                spec = self.specs.get(m)
                if spec is None:
                    emb[m] = self.adapter.encode(m, inputs[m])
                    continue
                states[m] = hidden_states(self.adapter, m, inputs[m], {spec.layer, *spec.read_layers})
                top = max(states[m])
                emb[m] = self.adapter.suffix(m, states[m][top], inputs[m], top)
        return {m: features(self.adapter, s, inputs[m], emb[_other(m)], states[m]) for m, s in self.specs.items()}, emb

    def explain(self, pixels: torch.Tensor, text: TextBatch, seeds: list[int]):
        ad = self.adapter
        feats, emb = self.pair_features(pixels, text)
        with torch.no_grad():
            cap = {m: token_capacity(lambdas(self.nets[m], f), f) for m, f in feats.items()}
        meta = {"similarity": (emb["image"] * emb["text"]).sum(-1).cpu(),
                **{f"{m}_capacity": c.cpu() for m, c in cap.items()}}
        image_map = normalise_minmax(ad.hidden_to_image_map(cap["image"])) if "image" in cap else None
        text_scores = ad.hidden_to_text_scores(cap["text"], text) if "text" in cap else None
        return image_map, text_scores, meta


def readout_specs(adapter, hparams: dict, modalities=MODALITIES) -> dict[str, ReadoutSpec]:
    """Each modality's ReadoutSpec from m2ib_readout hyperparameters (defaults filled in and checked;
    the script that trains readouts uses it without building the Attributor)."""
    hp = ReadoutAttributor.check_params(dict(hparams))
    settings = adapter.default_m2ib_settings()
    out = {}
    for m in modalities:
        layer = adapter.check_layer(m, settings[f"{m}_layer"] if hp[f"{m}_layer"] is None else hp[f"{m}_layer"])
        beta = settings[f"{m}_beta"] if hp[f"{m}_beta"] is None else hp[f"{m}_beta"]
        read = hp[f"{m}_read_layers"]
        read = range(layer, adapter.last_valid_layer(m) + 1) if read is None else read
        _check_same_shapes(adapter, m, [layer, *read])
        out[m] = ReadoutSpec(m, layer, float(beta), tuple(adapter.check_layer(m, l) for l in read), hp[f"{m}_alpha"],
                             float(hp["init_alpha"]), hp["train_data"], hp["train_split"], hp["train_pairs"],
                             hp["epochs"], hp["batch_size"], float(hp["lr"]), hp["train_seed"])
    return out


def _check_same_shapes(adapter, modality: str, layers) -> None:
    """The bottleneck and read layers must have one token grid (read per token together); refuse
    towers whose layers differ (ResNet stages) in one line, on a one-input probe (one pass where the
    adapter reports its blocks, as hidden_states)."""
    states = hidden_states(adapter, modality, _probe(adapter, modality), layers)
    shapes = {l: tuple(h.shape[1:]) for l, h in states.items()}
    if len(set(shapes.values())) > 1:
        raise UnsupportedError(
            f"m2ib_readout: the {modality} layers {sorted(shapes)} of model {adapter.name} have different shapes "
            f"{sorted(set(shapes.values()))} (e.g. ResNet stages), so a readout cannot read them per token "
            f"together; read the bottleneck layer alone: {modality}_layer=L {modality}_read_layers=[L]")
