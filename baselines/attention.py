"""Attention baselines, read through adapter.record_attention: last-layer raw attention, attention
rollout (Abnar & Zuidema 2020) and gradient-weighted relevance (Chefer et al. 2021).

The pooled token's row is read (adapter.pooled_position: the class token for images, the
end-of-text token of CLIP, position 0 of BERT, the last position of SigLIP's text). Image rows go to
the pixel frame with adapter.hidden_to_image_map (which drops the class token's own column), text
rows to token scores with adapter.hidden_to_text_scores. Families whose towers have no attention
(e.g. ResNet image towers) or pool every position instead of one token (SigLIP's attention-pool
head, mean pooling) raise UnsupportedError.

Note: raw attention and rollout of one tower do not depend on the other modality at all (the image
map is the same for every caption); only Chefer's gradient weighting makes them pair-specific.
"""
from __future__ import annotations

import torch

from baselines.base import (Baseline, embedding_score_fn, image_embedding, image_score_fn,
                               require_attention, require_pooled_position, text_embedding, text_length)
from m2ib.core.attributor import register_method
from m2ib.core.errors import InputError, UnsupportedError


def record_similarity(method: Baseline, modality: str, pixels, text, grad: bool, parts: bool = False):
    """The explained similarity of each pair computed while `modality`'s attention is recorded, the
    other modality's embedding held fixed: (score (B,), per-block attention list, per-block parts or
    None; see ModelAdapter.record_attention). grad: the recorded tensors carry a graph to the score
    (the input, pixels or token embeddings, requires grad; the weights are frozen)."""
    adapter = method.adapter
    with torch.enable_grad() if grad else torch.no_grad():
        if modality == "image":
            run = image_score_fn(adapter, text_embedding(adapter, text))
            x = pixels.detach().clone().requires_grad_(grad)
        else:
            run = embedding_score_fn(adapter, text, image_embedding(adapter, pixels))
            x = adapter.embed_tokens(text)[:, : text_length(adapter, text)].detach().requires_grad_(grad)
        try:
            with (adapter.record_attention(modality, parts=True) if parts
                  else adapter.record_attention(modality)) as rec:
                score = run(x)
        except UnsupportedError as exc:    # the adapter's reason, named for the refusing method
            if str(exc).startswith(f"{method.name}:"):
                raise
            raise UnsupportedError(f"{method.name}: {exc}") from exc
        except NotImplementedError as exc:
            raise UnsupportedError(f"{method.name}: model {adapter.name} cannot record {modality} "
                                   f"attention: {exc}") from exc
    attn = require_attention(adapter, modality, rec, method.name)
    if parts and len(rec.parts) != len(attn):
        raise UnsupportedError(f"{method.name}: model {adapter.name} reported the query/key/value of "
                               f"{len(rec.parts)} of its {len(attn)} {modality} blocks")
    return score, attn, rec.parts if parts else None


class _AttentionBaseline(Baseline):
    """Records each block's (B, heads, N, N) attention during one encode and turns it into the
    pooled token's row of per-position values; subclasses say how (`relevance`)."""

    needs_grad = False

    def relevance(self, attn: list[torch.Tensor], score: torch.Tensor) -> torch.Tensor:
        """(B, N, N) relevance matrix between positions."""
        raise NotImplementedError

    def _rows(self, modality, pixels, text, pooled_index):
        score, attn, _ = record_similarity(self, modality, pixels, text, self.needs_grad)
        with torch.enable_grad() if self.needs_grad else torch.no_grad():
            rel = self.relevance(attn, score)
        rows = torch.arange(rel.shape[0], device=rel.device)
        return rel[rows, pooled_index.to(rel.device)].detach()

    def explain_image(self, pixels, text, seeds):
        pooled = require_pooled_position(self.adapter, "image", pixels, self.name)
        return self.adapter.hidden_to_image_map(self._rows("image", pixels, text, pooled))

    def explain_text(self, pixels, text, seeds):
        values = self._rows("text", pixels, text, require_pooled_position(self.adapter, "text", text, self.name))
        return self.adapter.hidden_to_text_scores(values, text)


@register_method("raw_attention")
class RawAttention(_AttentionBaseline):
    """The last block's attention probabilities from the pooled token, averaged over heads."""

    def relevance(self, attn, score):
        return attn[-1].float().mean(dim=1)


@register_method("rollout")
class AttentionRollout(_AttentionBaseline):
    """Attention rollout (Abnar & Zuidema 2020): per block A' = 0.5 * fuse_heads(A) + 0.5 * I
    (the residual path), rows renormalised, multiplied from block `start_layer` (0) to the last.
    head_fusion: 'mean' (the paper's choice, default), 'max' or 'min'."""

    defaults = {"start_layer": 0, "head_fusion": "mean"}

    @classmethod
    def check_values(cls, hp):
        if hp["head_fusion"] not in ("mean", "max", "min"):
            raise InputError(f"method {cls.name!r}: head_fusion must be 'mean', 'max' or 'min', "
                             f"got {hp['head_fusion']!r}")

    def setup(self):
        _check_start_layer(self)

    def relevance(self, attn, score):
        fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
        fuse = fuse[self.hparams["head_fusion"]]
        eye = torch.eye(attn[0].shape[-1], device=attn[0].device, dtype=torch.float32)
        roll = eye.expand(attn[0].shape[0], -1, -1)
        for a in attn[self.hparams["start_layer"]:]:
            a = 0.5 * fuse(a.float()) + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            roll = a @ roll
        return roll


@register_method("chefer")
class GenericAttentionRelevance(_AttentionBaseline):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021, Eq. 5-6 for
    self-attention): R = I, then per block from `start_layer` (0) on
    R <- R + mean_heads((dA ⊙ A)^+) R, with dA = d s / d A, s the explained cosine similarity."""

    defaults = {"start_layer": 0}
    needs_grad = True

    def setup(self):
        _check_start_layer(self)

    def relevance(self, attn, score):
        if not score.requires_grad:
            raise UnsupportedError(f"{self.name}: the similarity of model {self.adapter.name} has no gradient "
                                   f"w.r.t. its recorded attention")
        grads = torch.autograd.grad(score.sum(), attn, allow_unused=True)
        if any(g is None for g in grads[self.hparams["start_layer"]:]):
            raise UnsupportedError(f"{self.name}: model {self.adapter.name} recorded attention that does not "
                                   f"reach its embedding, so it cannot be gradient-weighted")
        B, _, N, _ = attn[0].shape
        R = torch.eye(N, device=attn[0].device).expand(B, N, N)
        for a, g in list(zip(attn, grads))[self.hparams["start_layer"]:]:
            cam = (g.float() * a.detach().float()).clamp(min=0).mean(1)
            R = R + cam @ R
        return R


def _check_start_layer(method: Baseline) -> None:
    start = method.hparams["start_layer"]
    low = min(method.adapter.num_layers.values())
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < low:
        raise InputError(f"method {method.name!r}: start_layer must be an integer in 0..{low - 1} for "
                         f"{method.adapter.name}, got {start!r}")
