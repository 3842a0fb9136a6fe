"""ROAR+: remove what a map calls important, fine-tune on the degraded data, and see what is left.

RemOve And Retrain (Hooker et al., NeurIPS 2019) retrains after removing the top-ranked inputs so
that a score drop cannot come from the distribution shift alone; the M2IB paper (Wang et al. 2023)
reports this "ROAR+" for image and text. Protocol here, per explained modality:
1. Maps come from the ORIGINAL model (attribute(adapter, samples)) for every sample.
2. Samples are split by `seed` into a fine-tune part (`finetune_fraction`, 80%) and an evaluation
   part (20%); both are degraded: image pixels whose map value is strictly above the row's
   `percentile` (75th) -> the per-channel mean of the clean preprocessed pixels of all samples (a
   fixed, uninformative value as in ROAR); text word tokens scored strictly above the row's
   percentile of word scores -> the blank token. The other modality stays clean.
3. A copy of the model (adapter.copy()) is fine-tuned contrastively (symmetric InfoNCE with a fixed
   `temperature`, AdamW, constant lr, batches shuffled by (seed, epoch)) on the degraded fine-tune
   part through adapter.trainable_copy() (the original adapter stays frozen; the copy stays in eval
   mode, no dropout), so CPU runs are bit-for-bit repeatable.
4. On the degraded evaluation part: `similarity` = mean matched-pair cosine similarity, and
   retrieval R@1 in both directions among the evaluation pairs (a hit only when the matched pair
   scores strictly higher than every other candidate; ties are misses). Lower is better: the
   removed inputs carried the information. `similarity_before` is the same before fine-tuning.
The same is run with uniform random maps (method 'random', seeded), the reference any method should
beat. With `checkpoint_dir`, maps and each fine-tune (model + optimiser, after every epoch) are
saved and a re-run resumes, so a long job on a real model survives interruption.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from m2ib.core.attributor import MODALITIES, attribute_with, resolve
from m2ib.core.errors import InputError
from m2ib.core.metric import MetricContext, register_metric
from m2ib.core.progress import progress_bar
from m2ib.core.records import Attribution, Sample, TextBatch
from m2ib.models.base import ModelAdapter
from metrics.inputs import aligned_text_scores, image_maps, sample_ids, text_scores


@dataclass(frozen=True)
class RoarConfig:
    percentile: float = 75.0
    finetune_fraction: float = 0.8
    epochs: int = 3
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 32
    temperature: float = 0.07
    seed: int = 0

    def check(self) -> "RoarConfig":
        if not 0.0 < self.percentile < 100.0:
            raise InputError(f"ROAR percentile must be in (0, 100), got {self.percentile}")
        if not 0.0 < self.finetune_fraction < 1.0:
            raise InputError(f"finetune_fraction must be in (0, 1), got {self.finetune_fraction}")
        if self.epochs < 0 or self.batch_size < 2 or self.lr < 0 or self.temperature <= 0:
            raise InputError(f"bad ROAR training settings: {self}")
        return self


# ---- data ---------------------------------------------------------------------------------------------
def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (fine-tune, evaluation) index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(fraction * n))
    if cut < 2 or n - cut < 2:
        raise InputError(f"ROAR+ needs at least 2 fine-tune and 2 evaluation pairs; {n} samples with "
                         f"finetune_fraction {fraction} give {cut} and {n - cut}")
    return np.sort(order[:cut]), np.sort(order[cut:])


def degrade_images(pixels: torch.Tensor, maps: torch.Tensor, percentile: float, fill: torch.Tensor) -> torch.Tensor:
    """Pixels whose map value is strictly above the row's percentile -> fill (3,) per channel."""
    maps = maps.to(pixels.device, torch.float64)
    cut = torch.quantile(maps.reshape(maps.shape[0], -1), percentile / 100.0, dim=1)
    remove = (maps > cut[:, None, None])[:, None]
    return torch.where(remove, fill.to(pixels.device, pixels.dtype)[None, :, None, None], pixels)


def degrade_text(text: TextBatch, scores: torch.Tensor, percentile: float, blank_token_id: int) -> TextBatch:
    """Word tokens scored strictly above the row's percentile of word scores -> the blank token."""
    drop = torch.zeros_like(text.word_mask, dtype=torch.bool)
    mask = text.word_mask.bool()
    scores = scores.to(drop.device, torch.float64)
    for i in range(drop.shape[0]):
        words = mask[i].nonzero().flatten()
        values = scores[i, words]
        drop[i, words[values > torch.quantile(values, percentile / 100.0)]] = True
    return text.with_blanks(drop, blank_token_id)


def _encode_batches(adapter: ModelAdapter, pixels: torch.Tensor, text: TextBatch, batch_size: int):
    img, txt = [], []
    with torch.no_grad():
        for start in range(0, len(text), batch_size):
            rows = list(range(start, min(start + batch_size, len(text))))
            img.append(adapter.encode_image(pixels[rows]))
            txt.append(adapter.encode_text(text.select(rows)))
    return torch.cat(img), torch.cat(txt)


def evaluate_pairs(adapter: ModelAdapter, pixels: torch.Tensor, text: TextBatch, batch_size: int = 64) -> dict:
    """Per pair: matched cosine similarity and R@1 hits (strictly best) both ways among all pairs."""
    img, txt = _encode_batches(adapter, pixels, text, batch_size)
    sims = (img.double() @ txt.double().T).cpu()
    diag = sims.diagonal()
    others = sims.clone()
    others.fill_diagonal_(float("-inf"))
    return {"similarity": diag.numpy(),
            "r1_image_to_text": (diag > others.max(1).values).int().numpy(),
            "r1_text_to_image": (diag > others.max(0).values).int().numpy()}


# ---- training -----------------------------------------------------------------------------------------
def finetune(adapter: ModelAdapter, pixels: torch.Tensor, text: TextBatch, cfg: RoarConfig,
             checkpoint: Optional[Path] = None, tag: str = "", progress: bool = True) -> ModelAdapter:
    """A fine-tuned copy of `adapter` (symmetric InfoNCE, fixed temperature); resumes from `checkpoint`."""
    model, params = adapter.trainable_copy()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=model.device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        first = int(state["epoch"])
        if first > cfg.epochs:
            raise InputError(f"checkpoint {checkpoint} holds {first} epochs, more than the {cfg.epochs} asked for; "
                             f"delete it or ask for at least {first} epochs")
    n = len(text)
    bs = min(cfg.batch_size, n)
    steps = (n // bs) * max(cfg.epochs - first, 0)
    bar = progress_bar(total=steps, desc=f"ROAR+ fine-tune {tag}", enabled=progress)
    for epoch in range(first, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - bs + 1, bs):         # full batches only: equal-size contrastive sets
            rows = order[start:start + bs].tolist()
            img = model.encode_image(pixels[rows])
            txt = model.encode_text(text.select(rows))
            logits = img @ txt.T / cfg.temperature
            target = torch.arange(len(rows), device=logits.device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
            tmp.replace(checkpoint)
    bar.close()
    for p in params:
        p.requires_grad_(False)
    return model


# ---- the metric ---------------------------------------------------------------------------------------
def _key(cfg: RoarConfig, ids: Sequence[str], adapter: ModelAdapter) -> str:
    """Checkpoint key: everything that shapes the run except the number of epochs (so runs extend)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "epochs"}
    with torch.no_grad():
        weights = [round(float(p.double().sum()), 6) for p in adapter.parameters()]
    blob = json.dumps([settings, list(ids), getattr(adapter, "name", "?"), weights], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _cached_attribution(fn: Callable, adapter, samples, path: Optional[Path]) -> Attribution:
    if path is not None and path.is_file():
        return torch.load(path, weights_only=False)
    attribution = fn(adapter, samples)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(attribution, path)
    return attribution


def roar_plus(adapter: ModelAdapter, samples: Sequence[Sample],
              methods: Union[Callable, str, Mapping[str, Union[Callable, str]]],
              modalities: Sequence[str] = MODALITIES, config: Optional[RoarConfig] = None,
              random_baseline: bool = True, checkpoint_dir=None, progress: bool = True) -> pd.DataFrame:
    """Rows per evaluation sample, method and modality: similarity_before, similarity, r1_image_to_text,
    r1_text_to_image (0/1), plus the split sizes. `methods`: one attribute function / factory / name,
    or a {name: ...} mapping of them (see m2ib.core.attributor.resolve)."""
    cfg = (config or RoarConfig()).check()
    samples = list(samples)
    ids = sample_ids(samples)
    for m in modalities:
        if m not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, got {m!r}")
    fns = {k: resolve(v) for k, v in methods.items()} if isinstance(methods, Mapping) else {None: resolve(methods)}
    if random_baseline:
        if "random" in fns:
            raise InputError("a method is named 'random', which clashes with ROAR+'s random-map reference")
        fns["random"] = attribute_with("random", seed=cfg.seed)   # the registered random control
    ft_idx, ev_idx = split_indices(len(samples), cfg.finetune_fraction, cfg.seed)
    chunks = [adapter.preprocess([s.image for s in samples[i:i + 64]]) for i in range(0, len(samples), 64)]
    pixels = torch.cat(chunks)
    text = adapter.tokenize([s.caption for s in samples])
    fill = pixels.double().mean(dim=(0, 2, 3))
    ckpt = Path(checkpoint_dir) / _key(cfg, ids, adapter) if checkpoint_dir is not None else None

    rows = []
    bar = progress_bar(total=len(fns) * len(modalities), desc="ROAR+", enabled=progress, leave=True)
    for name, fn in fns.items():
        tag = name or "method"
        attribution = _cached_attribution(fn, adapter, samples, ckpt / f"{tag}.attribution.pt" if ckpt else None)
        label = name or attribution.method
        if name is None and random_baseline and label == "random":
            raise InputError("the method's attributions are named 'random', which clashes with ROAR+'s random-map "
                             "reference; pass methods={'name': ...} or random_baseline=False")
        for modality in modalities:
            bar.set_postfix(method=label, modality=modality)
            if modality == "image":
                maps = torch.as_tensor(image_maps(attribution, samples, adapter.image_size))
                deg_pixels, deg_text = degrade_images(pixels, maps, cfg.percentile, fill), text
            else:
                scores, _ = text_scores(attribution, samples)
                aligned = aligned_text_scores(attribution, text, ids, 0, scores)
                deg_pixels, deg_text = pixels, degrade_text(text, aligned, cfg.percentile, adapter.blank_token_id)
            ft_rows, ev_rows = ft_idx.tolist(), ev_idx.tolist()
            before = evaluate_pairs(adapter, deg_pixels[ev_rows], deg_text.select(ev_rows), cfg.batch_size)
            tuned = finetune(adapter, deg_pixels[ft_rows], deg_text.select(ft_rows), cfg,
                             ckpt / f"{tag}.{modality}.pt" if ckpt else None, f"{label}/{modality}", progress)
            after = evaluate_pairs(tuned, deg_pixels[ev_rows], deg_text.select(ev_rows), cfg.batch_size)
            for j, i in enumerate(ev_rows):
                rows.append({"sample_id": ids[i], "method": label, "modality": modality,
                             "similarity_before": float(before["similarity"][j]),
                             "similarity": float(after["similarity"][j]),
                             "r1_image_to_text": int(after["r1_image_to_text"][j]),
                             "r1_text_to_image": int(after["r1_text_to_image"][j]),
                             "n_finetune": len(ft_rows), "n_eval": len(ev_rows)})
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


@register_metric("roar", columns=("roar_similarity_before", "roar_similarity", "roar_r1_image_to_text",
                                  "roar_r1_text_to_image"), whole_dataset=True)
def roar(attribution: Attribution, adapter: ModelAdapter, samples: Sequence[Sample], context: MetricContext,
         modalities: list = ("image", "text"), percentile: float = 75.0, finetune_fraction: float = 0.8,
         epochs: int = 3, lr: float = 1e-5, weight_decay: float = 0.0, batch_size: int = 32,
         temperature: float = 0.07, seed: int = 0) -> pd.DataFrame:
    """ROAR+: remove what the map calls important, fine-tune on the degraded data, re-evaluate.

    ROAR+ of one method's maps (the random control is the registered `random` method, run as any
    other method of the table); R@1 as 0/100 per pair so its mean is a percentage. Fine-tunes are
    checkpointed under context.work_dir/roar/<the exact maps' cache key>, so a run resumes."""
    modalities = [m for m in modalities if getattr(attribution, m) is not None]
    work = None
    if context.work_dir is not None:   # one folder per exact set of maps: other hyperparameters never reuse it
        work = Path(context.work_dir) / "roar" / attribution.meta.get("cache_key", attribution.method)
    config = RoarConfig(percentile, finetune_fraction, epochs, lr, weight_decay, batch_size, temperature, seed)
    rows = roar_plus(adapter, samples, {attribution.method: lambda _adapter, _samples: attribution},
                     modalities=modalities, config=config, random_baseline=False, checkpoint_dir=work,
                     progress=context.progress)
    rows = rows.rename(columns={"similarity_before": "roar_similarity_before", "similarity": "roar_similarity",
                                "r1_image_to_text": "roar_r1_image_to_text", "r1_text_to_image": "roar_r1_text_to_image"})
    for col in ("roar_r1_image_to_text", "roar_r1_text_to_image"):
        rows[col] = rows[col] * 100.0
    return rows.drop(columns=["n_finetune", "n_eval"])
