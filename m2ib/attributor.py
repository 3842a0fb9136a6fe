"""The one interface every attribution method implements, and the registry that finds them by name.

An Attributor gets a batch already in the model's input form (preprocessed pixels and a TextBatch,
on the adapter's device) plus one seed per pair, and returns an Attribution. Seeds are per pair (not
per batch) so a pair's result does not depend on which batch it was computed in.
"""
from __future__ import annotations

import abc
import zlib
from typing import Callable, Sequence

import torch

from m2ib.errors import InputError
from m2ib.models.base import ModelAdapter
from m2ib.types import Attribution, TextBatch

_METHODS: dict[str, Callable[..., "Attributor"]] = {}


class Attributor(abc.ABC):
    """Explains the cosine similarity of each image-text pair, per modality."""

    name: str = "?"
    modalities: tuple[str, ...] = ("image", "text")

    def __init__(self, adapter: ModelAdapter, **hparams):
        self.adapter = adapter
        self.hparams = hparams

    @abc.abstractmethod
    def attribute(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> Attribution:
        """(B, 3, H, W) pixels and a B-row TextBatch -> Attribution with B rows."""

    def pair_similarity(self, pixels: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """The explained scalar: cosine similarity of each pair's normalised embeddings, (B,)."""
        return (self.adapter.encode_image(pixels) * self.adapter.encode_text(text)).sum(-1)


def pair_seed(sample_id: str, seed: int = 0) -> int:
    """A pair's seed from its sample id and the run seed: independent of batch and position."""
    return zlib.crc32(f"{int(seed)}:{sample_id}".encode()) & 0x7FFFFFFF


def register_method(name: str):
    """Class decorator: make an Attributor constructible by name (get_method)."""
    def wrap(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls
    return wrap


def available_methods() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def get_method(name: str, adapter: ModelAdapter, **hparams) -> Attributor:
    _import_all()
    if name not in _METHODS:
        raise InputError(f"unknown attribution method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](adapter, **hparams)


def _import_all() -> None:
    """Import the modules whose classes register themselves."""
    import importlib
    for module in ("m2ib.method", "baselines"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def attribute_in_batches(attributor: Attributor, samples: Sequence, seed: int = 0, batch_size: int = 8,
                         progress: bool = False, on_batch: Callable | None = None) -> list[Attribution]:
    """Run `attributor` over Samples batch by batch, pair seeds from sample ids (pair_seed).

    on_batch(chunk, attribution) is called as each batch finishes (e.g. to cache it at once).
    Returns the per-batch Attributions in order.
    """
    from tqdm.auto import tqdm
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    adapter, parts = attributor.adapter, []
    bar = tqdm(total=len(samples), desc=attributor.name, unit="pair", disable=not progress, leave=False)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        try:
            pixels = adapter.preprocess([s.image for s in chunk])
            text = adapter.tokenize([s.caption for s in chunk])
            att = attributor.attribute(pixels, text, [pair_seed(s.id, seed) for s in chunk])
        except InputError as exc:
            raise InputError(f"{attributor.name} on samples {[s.id for s in chunk]} (positions within this "
                             f"list): {exc}") from exc
        if on_batch is not None:
            on_batch(chunk, att)
        parts.append(att)
        bar.update(len(chunk))
    bar.close()
    return parts


def _concat_meta(values: list):
    """Per-row meta of several batches as one: lists joined, per-row tensors concatenated (2-D ones
    padded to the widest), anything else kept as the list of per-batch values."""
    if all(isinstance(v, list) for v in values):
        return [x for v in values for x in v]
    if all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
        if all(v.dim() == 2 for v in values):
            width = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
        if len({v.shape[1:] for v in values}) == 1:
            return torch.cat([v.cpu() for v in values])
    return values


def concat_attributions(parts: list[Attribution]) -> Attribution:
    """Join per-batch Attributions of one method (rows in order). Text maps may differ in width."""
    if not parts:
        raise InputError("nothing to concatenate")

    def cat(name):
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        if name in ("text", "token_mask"):
            width = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
        return torch.cat([v.cpu() for v in values])

    meta: dict = {}
    for k in parts[0].meta:
        meta[k] = _concat_meta([p.meta.get(k) for p in parts])
    return Attribution(method=parts[0].method, image=cat("image"), text=cat("text"),
                       tokens=[t for p in parts for t in p.tokens], token_mask=cat("token_mask"),
                       seconds=sum(p.seconds for p in parts), meta=meta)
