"""What every baseline shares: the explained scalar, hyperparameter checks and the text helpers.

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
from typing import Callable, Iterable, Sequence

import torch

from m2ib.core.attributor import Attributor
from m2ib.core.errors import InputError, UnsupportedError
from m2ib.core.progress import progress_bar
from m2ib.core.records import TextBatch


class Baseline(Attributor):
    """An Attributor built from two per-modality functions; checks, masking, timing and meta come from
    the Attributor template. Subclasses set `defaults` (documented hyperparameters, overridable as
    constructor kwargs, which is where the Hydra config lands) and implement `explain_image` /
    `explain_text`.
    """

    @abc.abstractmethod
    def explain_image(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> torch.Tensor:
        """(B, H, W) map in the preprocessed frame."""

    @abc.abstractmethod
    def explain_text(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> torch.Tensor:
        """(B, T) scores on the TextBatch positions (masked to word tokens by the template)."""

    def explain(self, pixels, text, seeds):
        image = self.explain_image(pixels, text, seeds) if "image" in self.modalities else None
        scores = self.explain_text(pixels, text, seeds) if "text" in self.modalities else None
        return image, scores, {}

    def pairs(self, n: int, what: str) -> Iterable[int]:
        """range(n) with a progress bar (per-pair loops of the perturbation methods are long)."""
        return progress_bar(range(n), desc=f"{self.name} {what}", enabled=self.hparams["progress"] and n >= 2)


# ---- hyperparameter checks (no model needed) -----------------------------------------------------
def positive_int(method: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"method {method!r}: hyperparameter {name} must be a positive integer, got {value!r}")
    return value


def probability(method: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(f"method {method!r}: hyperparameter {name} must be in (0, 1), got {value!r}")
    return float(value)


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
        emb = adapter.encode_text(batch.with_blanks(~keep, adapter.blank_token_id))
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


def require_pooled_position(adapter, modality: str, inputs, method: str) -> torch.Tensor:
    """adapter.pooled_position (the one token whose output becomes the embedding), or
    UnsupportedError for towers that pool several positions (attention-pool head, mean)."""
    index = adapter.pooled_position(modality, inputs)
    if index is None:
        raise UnsupportedError(
            f"{method}: model {getattr(adapter, 'name', '?')} pools its {modality} tokens as a whole (attention-pool "
            f"head or mean), not through one token whose attention row could be read; use another method")
    return index

