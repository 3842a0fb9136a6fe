"""'FastIG' as the NIB release benchmarks it (LMBTough/NIB, salicncy/fast_ig.py; the NIB paper lists
FastIG as a baseline with a reference to Hou et al.; that paper's text could not be checked here).

What the release computes is not an integral: the gradient of the explained score with respect to the
LAST block's attention probabilities times those probabilities, averaged over heads, read in the pooled
token's row (image: class token -> patches; text: the end-of-text row -> tokens):

    M = mean_heads( (d s / d A_L) * A_L )[pooled, :]

We sum the matrix over its query rows instead of indexing the pooled row: in the last block only the
rows of the positions that reach the embedding have a gradient, so the sum IS the pooled row (class
token / end of text for CLIP, as in the release; [CLS] for BERT text towers; the last position of
SigLIP's text). Towers that pool several positions (SigLIP's attention-pool head, mean pooling) are
refused like the other attention baselines (adapter.pooled_position is None): the release defines the
map as one pooled token's row, and such a tower has none.

One forward and one backward per modality. We explain s = cos(e_image, e_text) (the release uses CLIP's
logit, exp(t) * s: a positive constant factor, so its min-max normalised maps are the same). Image maps
are returned raw (not min-max normalised), text scores raw and masked to the word tokens.
Models whose towers report no attention raise UnsupportedError (baselines.attention).
"""
from __future__ import annotations

import torch

from baselines.attention import _AttentionBaseline, record_similarity
from m2ib.core.attributor import register_method
from m2ib.core.errors import UnsupportedError


@register_method("fastig")
class FastIGMap(_AttentionBaseline):
    """FastIG as NIB's benchmark runs it: the last block's attention x its gradient, pooled token's row.

    Averaged over heads (module docstring: equations and open choices)."""

    needs_grad = True

    def _rows(self, modality, pixels, text, pooled_index):
        score, attn, _ = record_similarity(self, modality, pixels, text, grad=True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(score.sum(), attn[-1], allow_unused=True)
        if grad is None:
            raise UnsupportedError(f"{self.name}: the similarity of model {self.adapter.name} has no gradient "
                                   f"w.r.t. its last block's {modality} attention")
        return (grad.float() * attn[-1].detach().float()).mean(1).sum(1)
