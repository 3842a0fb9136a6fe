"""What every baseline shares: the explained scalar, input checks, hyperparameters and the text helpers.

The explained scalar
--------------------
Every baseline explains s = cos(e_image, e_text), the cosine similarity of the pair's normalised
image and text embeddings - the same quantity M2IB's fitting term uses (Wang et al. 2023, Eq. 5).
CLIP's logit is s times a learnt temperature exp(t); since that factor is a positive constant, any
attribution that is linear in the score (gradients, IG, SHAP, RISE, occlusion) only changes by
that factor and any rank-based use of a map is unchanged: the choice is temperature-invariant.

An image map explains s with respect to the pixels while the text embedding is held fixed (a
constant of the pair), a text map explains s with respect to the tokens while the image embedding
is held fixed. Each method only calls the ModelAdapter interface, never model internals.
"""
from __future__ import annotations

import abc
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from m2ib.attributor import Attributor
from m2ib.errors import InputError, UnsupportedError
from m2ib.models.base import MODALITIES
from m2ib.types import Attribution, TextBatch

#: Hyperparameters every baseline accepts, besides its own `defaults`.
COMMON_DEFAULTS: dict[str, Any] = {
    "modalities": ("image", "text"),   # which maps to compute; the other one is None
    "progress": True,                  # tqdm bars on the per-pair loops
}


class Baseline(Attributor):
    """An Attributor built from two per-modality functions, with shared checks, masking and timing.

    Subclasses set `defaults` (documented hyperparameters, overridable as constructor kwargs, which
    is where the Hydra config lands) and implement `explain_image` / `explain_text`.
    """

    defaults: dict[str, Any] = {}

    def __init__(self, adapter, **hparams):
        known = {**COMMON_DEFAULTS, **self.defaults}
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            raise InputError(f"method {self.name!r}: unknown hyperparameter(s) {unknown}; "
                             f"known: {sorted(known)}")
        merged = {**known, **hparams}
        super().__init__(adapter, **merged)
        mods = merged["modalities"]
        mods = (mods,) if isinstance(mods, str) else tuple(mods)
        bad = [m for m in mods if m not in MODALITIES]
        if bad or not mods:
            raise InputError(f"method {self.name!r}: modalities must be a non-empty subset of "
                             f"{MODALITIES}, got {merged['modalities']!r}")
        self.modalities = mods
        self.check_hparams()

    # ---- to implement -------------------------------------------------------------------------
    def check_hparams(self) -> None:
        """Raise InputError for a hyperparameter value that cannot work (called once, at init)."""

    @abc.abstractmethod
    def explain_image(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> torch.Tensor:
        """(B, H, W) map in the preprocessed frame."""

    @abc.abstractmethod
    def explain_text(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> torch.Tensor:
        """(B, T) scores on the TextBatch positions (masked to word tokens by the caller)."""

    # ---- the shared entry point -----------------------------------------------------------------
    def attribute(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> Attribution:
        seeds = check_batch(self.adapter, pixels, text, seeds, self.name)
        start = time.perf_counter()
        image = text_scores = None
        if "image" in self.modalities:
            image = self.explain_image(pixels, text, seeds).detach().float()
            expect = (pixels.shape[0], *self.adapter.image_size)
            if tuple(image.shape) != expect:
                raise RuntimeError(f"{self.name}: image map has shape {tuple(image.shape)}, expected {expect}")
        if "text" in self.modalities:
            text_scores = self.explain_text(pixels, text, seeds).detach().float()
            if tuple(text_scores.shape) != tuple(text.ids.shape):
                raise RuntimeError(f"{self.name}: text scores have shape {tuple(text_scores.shape)}, "
                                   f"expected {tuple(text.ids.shape)}")
            text_scores = text_scores * text.word_mask.to(text_scores.device)
        seconds = time.perf_counter() - start
        return Attribution(method=self.name, image=image, text=text_scores, tokens=text.tokens,
                           token_mask=text.word_mask, seconds=seconds,
                           meta={"hparams": {k: v for k, v in self.hparams.items() if k != "progress"},
                                 "seeds": list(seeds)})

    def pairs(self, n: int, what: str) -> Iterable[int]:
        """range(n) with a progress bar (per-pair loops of the perturbation methods are long)."""
        off = not self.hparams["progress"] or n < 2
        return tqdm(range(n), desc=f"{self.name} {what}", leave=False,
                    disable=True if off else None)   # None: only on a terminal, not in logs


# ---- input checks ---------------------------------------------------------------------------------
def check_batch(adapter, pixels, text, seeds, method: str) -> list[int]:
    """Reject a batch whose parts do not fit together, naming the offending input."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InputError(f"{method}: pixels must be a (B, 3, H, W) tensor, got {shape}")
    if tuple(pixels.shape[-2:]) != tuple(adapter.image_size):
        raise InputError(f"{method}: pixels are {tuple(pixels.shape[-2:])} but model {adapter.name} "
                         f"expects preprocessed images of {tuple(adapter.image_size)}; use adapter.preprocess")
    if not isinstance(text, TextBatch):
        raise InputError(f"{method}: text must be a TextBatch (adapter.tokenize), got {type(text).__name__}")
    if len(text) != pixels.shape[0]:
        raise InputError(f"{method}: {pixels.shape[0]} images but {len(text)} captions")
    seeds = list(seeds)
    if len(seeds) != pixels.shape[0]:
        raise InputError(f"{method}: {pixels.shape[0]} pairs need {pixels.shape[0]} seeds (one per pair), "
                         f"got {len(seeds)}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) and not (hasattr(s, "__index__")):
            raise InputError(f"{method}: seed of pair {i} must be an integer, got {s!r}")
        if not 0 <= int(s) < 2 ** 63:
            raise InputError(f"{method}: seed of pair {i} must be in [0, 2**63), got {s!r}")
    return [int(s) for s in seeds]


def positive_int(method: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"method {method!r}: hyperparameter {name} must be a positive integer, got {value!r}")
    return value


def probability(method: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(f"method {method!r}: hyperparameter {name} must be in (0, 1), got {value!r}")
    return float(value)


def generator(seed: int) -> torch.Generator:
    """A CPU generator for one pair: random draws happen on the CPU so a pair's masks are the same
    on every device and in every batch."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


# ---- the explained scalar -------------------------------------------------------------------------
@torch.no_grad()
def text_embedding(adapter, text: TextBatch) -> torch.Tensor:
    """Fixed (B, D) text embedding: a constant of the pair when explaining the image."""
    return adapter.encode_text(text).detach()


@torch.no_grad()
def image_embedding(adapter, pixels: torch.Tensor) -> torch.Tensor:
    """Fixed (B, D) image embedding: a constant of the pair when explaining the text."""
    return adapter.encode_image(pixels).detach()


def image_score_fn(adapter, text_emb: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """pixels (R, 3, H, W) -> (R,) cosine similarity to the fixed text embedding of pair r % B.

    Row r belongs to pair r % B: captum's IG stacks its interpolation steps step-major, and
    per-pair perturbation loops use B = 1, so one rule serves all callers.
    """
    def score(pixels: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(pixels.shape[0], device=text_emb.device) % text_emb.shape[0]
        return (adapter.encode_image(pixels) * text_emb[idx]).sum(-1)
    return score


def text_length(adapter, text: TextBatch) -> int:
    """Token positions the text encoder actually reads (causal towers stop after the last EOT)."""
    return int(adapter.token_positions("text", text).shape[1])


def repeat_rows(text: TextBatch, rows: int) -> TextBatch:
    """The TextBatch for `rows` stacked copies, row r being pair r % B."""
    return text.select([r % len(text) for r in range(rows)])


def embedding_score_fn(adapter, text: TextBatch, image_emb: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """token embeddings (R, L, C) -> (R,) cosine similarity to the fixed image embedding of pair
    r % B (same row rule as image_score_fn)."""
    def score(emb: torch.Tensor) -> torch.Tensor:
        rows = emb.shape[0]
        idx = torch.arange(rows, device=image_emb.device) % image_emb.shape[0]
        batch = text if rows == len(text) else repeat_rows(text, rows)
        return (adapter.encode_text_from_embeddings(emb, batch) * image_emb[idx]).sum(-1)
    return score


def with_blanks(adapter, text: TextBatch, keep: torch.Tensor) -> TextBatch:
    """`text` with the word tokens where keep is False replaced by adapter.blank_token_id (start
    and end of text and padding are never touched). keep: (B, T) bool."""
    drop = text.word_mask & ~keep.to(text.word_mask.device)
    ids = torch.where(drop, torch.full_like(text.ids, adapter.blank_token_id), text.ids)
    return TextBatch(ids, text.eot, text.tokens, text.word_mask, text.truncated, text.captions)


def word_positions(text: TextBatch, row: int) -> torch.Tensor:
    """Indices of the real word tokens of one row."""
    return text.word_mask[row].nonzero().flatten()


def presence_text_fn(adapter, text: TextBatch, image_emb: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """For ONE pair: presence (R, n_words) in {0, 1} -> (R,) similarity of the caption with the absent
    words blanked. The interpretable input of the text perturbation methods (RISE, occlusion,
    KernelSHAP): features are the word tokens, removal = the blank token."""
    if len(text) != 1:
        raise ValueError("presence_text_fn explains one pair at a time")
    words = word_positions(text, 0)

    def score(presence: torch.Tensor) -> torch.Tensor:
        rows = presence.shape[0]
        batch = repeat_rows(text, rows)
        keep = torch.ones_like(batch.ids, dtype=torch.bool)
        keep[:, words] = presence.to(keep.device) > 0.5
        emb = adapter.encode_text(with_blanks(adapter, batch, keep))
        return (emb * image_emb.expand(rows, -1)).sum(-1)
    return score


def words_to_scores(text: TextBatch, row: int, values: torch.Tensor) -> torch.Tensor:
    """(n_words,) values of one row's word tokens -> (T,) scores on the TextBatch positions."""
    out = torch.zeros(text.ids.shape[1], dtype=torch.float32, device=values.device)
    out[word_positions(text, row).to(values.device)] = values.float()
    return out


def require_attention(adapter, modality: str, recorded: list, method: str) -> list[torch.Tensor]:
    """The recorded per-block attention, or UnsupportedError when this model family gives none."""
    n = adapter.num_layers.get(modality) if hasattr(adapter, "num_layers") else None
    if not recorded or (n is not None and len(recorded) != n):
        raise UnsupportedError(
            f"{method}: model {getattr(adapter, 'name', '?')} ({getattr(adapter, 'family', '?')}) did not "
            f"report the attention of its {modality} encoder's blocks ({len(recorded)} of {n} recorded); "
            f"attention-based methods need a transformer {modality} tower")
    return recorded

