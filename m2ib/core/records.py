"""The two records every stage shares: a data Sample going in and an Attribution coming out.

Data flows one way (Sample -> adapter -> attributor -> Attribution -> metric), so these types are
the whole contract between the data sets, the methods and the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from m2ib.core.errors import InputError


@dataclass
class Sample:
    """One image-caption pair with its ground truth, in the image's ORIGINAL pixel frame.

    boxes: (K, 4) float array of x, y, w, h in original pixels (MS-CXR convention), K >= 0.
    target_words: words of the caption that name the target (text ground truth), if known.
    meta['alternative'] (optional): {caption, target_words, boxes} naming ANOTHER object of the same image,
        where the data set knows one (the grounded caption-sensitivity metric explains the image under it).
    """

    id: str
    image: Image.Image
    caption: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    target_words: Optional[list[str]] = None
    category: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextBatch:
    """Tokenised captions plus everything needed to read token-level results back.

    ids: (B, T) token ids; eot: (B,) index of the end-of-text token of each row.
    tokens: token strings per row (length T, padding as '').
    word_mask: (B, T) True on real word tokens (not start/end-of-text, not padding).
    truncated: per row, whether the caption was cut to fit the context length.
    """

    ids: torch.Tensor
    eot: torch.Tensor
    tokens: list[list[str]]
    word_mask: torch.Tensor
    truncated: list[bool]
    captions: list[str]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> "TextBatch":
        return TextBatch(self.ids.to(device), self.eot.to(device), self.tokens,
                         self.word_mask.to(device), self.truncated, self.captions)

    def with_blanks(self, drop: torch.Tensor, blank_token_id: int) -> "TextBatch":
        """The batch with the word tokens where drop (B, T) is True replaced by blank_token_id: the one
        way every method and metric removes words (start/end of text and padding are never touched)."""
        drop = drop.to(self.word_mask.device).bool() & self.word_mask.bool()
        ids = torch.where(drop, torch.full_like(self.ids, int(blank_token_id)), self.ids)
        return TextBatch(ids, self.eot, self.tokens, self.word_mask, self.truncated, self.captions)

    def select(self, index) -> "TextBatch":
        """Rows `index` (list of ints) as a new batch."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return TextBatch(self.ids[idx], self.eot[idx], [self.tokens[i] for i in index],
                         self.word_mask[idx], [self.truncated[i] for i in index],
                         [self.captions[i] for i in index])


@dataclass
class Attribution:
    """What every method (M2IB and each baseline) returns for a batch of pairs.

    image: (B, H, W) float32 map in the model's PREPROCESSED image frame (after resize + crop).
    text: (B, T) float32 score per token position; only positions where token_mask is True mean
        anything (others are 0).
    tokens: token strings per row; token_mask: (B, T) bool, real word tokens only.
    Either map may be None when a method explains one modality only.
    What figures need, attached by m2ib.api.explain and the pipeline (held in memory only; the
    attribution cache never stores them): samples, the explained pairs in order (original images,
    captions, known boxes); frame, the model's input geometry (m2ib.core.geometry.InputFrame) that
    maps lie in; hparams, the method's resolved hyperparameters.
    """

    method: str
    image: Optional[torch.Tensor]
    text: Optional[torch.Tensor]
    tokens: list[list[str]]
    token_mask: torch.Tensor
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    samples: Optional[list[Sample]] = None
    frame: Any = None
    hparams: Optional[dict[str, Any]] = None

    def __post_init__(self):
        for name in ("image", "text"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                bad = (~torch.isfinite(value.reshape(value.shape[0], -1))).any(1).nonzero().flatten().tolist()
                raise InputError(f"{self.method}: non-finite {name} attribution for batch rows {bad}")

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows) -> "Attribution":
        """The given rows (an iterable of ints) as a new Attribution (meta is not carried; the figure
        context, samples, frame and hparams, is)."""
        rows = list(rows)
        pick = lambda t: None if t is None else t[rows]
        return Attribution(self.method, pick(self.image), pick(self.text), [self.tokens[i] for i in rows],
                           self.token_mask[rows], seconds=self.seconds * len(rows) / max(len(self), 1),
                           samples=None if self.samples is None else [self.samples[i] for i in rows],
                           frame=self.frame, hparams=self.hparams)

    def plot(self, row: int = 0, **kwargs):
        """Figure of one pair: the map over the ORIGINAL image, tokens shaded by score, a colour bar
        (m2ib.core.figures.plot_attribution, which lists the options). Returns the matplotlib Figure."""
        from m2ib.core.figures import plot_attribution
        return plot_attribution(self, row, **kwargs)

    def save_figure(self, path, row: int = 0, dpi: int = 130, **kwargs):
        """plot(row, **kwargs) written to `path` (PNG, PDF, SVG by its suffix); returns the path."""
        from m2ib.core.figures import plot_attribution, save_figure
        return save_figure(plot_attribution(self, row, **kwargs), path, dpi=dpi)

    def word_scores(self, row: int) -> list[tuple[str, float]]:
        """(token, score) for the real word tokens of one row, in order."""
        mask = self.token_mask[row]
        return [(self.tokens[row][j], float(self.text[row, j])) for j in mask.nonzero().flatten().tolist()]


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
    if len(parts) == 1:
        return parts[0]

    def cat(name):
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        if name in ("text", "token_mask"):
            width = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
        return torch.cat([v.cpu() for v in values])

    meta = {k: _concat_meta([p.meta.get(k) for p in parts]) for k in parts[0].meta}
    samples = None if any(p.samples is None for p in parts) else [s for p in parts for s in p.samples]
    return Attribution(method=parts[0].method, image=cat("image"), text=cat("text"),
                       tokens=[t for p in parts for t in p.tokens], token_mask=cat("token_mask"),
                       seconds=sum(p.seconds for p in parts), meta=meta, samples=samples,
                       frame=parts[0].frame, hparams=parts[0].hparams)
