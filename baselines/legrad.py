"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, "LeGrad: An Explainability Method for
Vision Transformers via Feature Formation Sensitivity", ICCV 2025, arXiv 2404.03214). Official code:
WalBouss/LeGrad, also on PyPI as legrad-torch (read for facts only; not used, see below).

Equations implemented. For every block l in the used range, with A^l (heads x N x N) its attention
probabilities and z^l its output hidden state:
- s^l = cos( embed(z^l), e_other ): the pooled token of z^l sent through the tower's own pooling,
  final norm and projection (adapter.embed_hidden, as if the later blocks were skipped), scored
  against the other modality's fixed embedding; for the last block s^l is the explained similarity;
- E^l = mean over heads h and query rows i of ReLU( d s^l / d A^l_{h,i,:} )  -> one value per key
  (rows: the real positions; for text the padding rows of a batch are left out, so a pair's scores do
  not depend on its batch partners);
- E = sum_l E^l (an average over layers would only rescale it; the final min-max removes that); image: the
  prefix tokens' columns dropped, the patch grid bilinearly upsampled, then min-max normalised per pair.
Each s^l only depends on blocks <= l, so d s^l / d A^l is taken separately per layer (one backward
pass per used block).

Choices the paper leaves open (ours):
- Layers: every block (start_layer 0; the abstract: "we aggregate the signal over all layers");
  start_layer s >= 0 uses blocks s.., a negative s the last |s| blocks (the official code's
  default layer_index=-2, the last two).
- Pooled token: the model's own pooling (class token / EOT / [CLS]). variant='code' pools like the
  official CLIP code instead: the MEAN over the tokens (image: all, prefix tokens included; text:
  the real ones) before the final norm and projection.
- Text (our extension; the paper explains images): the same recipe on the text tower, pooled token =
  EOT ([CLS] for BERT). Gradient entries where the attention probability is exactly 0 (a causal or
  padding mask: the query cannot attend there at all) are dropped before the ReLU, since a masked
  entry's gradient describes a path the model does not have. Text scores are not normalised.
  Measured on the embedded model (first 50 test pairs): text AP 0.63, random 0.61 (Grad-ECLIP 0.68,
  Chefer 0.85): LeGrad's text map is well defined but barely informative there.
- Target of a pair: S = cos(image, text) as for every method here; the official code scores the
  normalised text embedding against each normalised intermediate image embedding, the same thing.
Why not legrad-torch 1.1 (PyPI): it requires open-clip-torch<=2.23.0 (we pin 3.x), swaps open_clip's
block / attention / vision forwards (types.MethodType), turns requires_grad on for the weights, and
assumes open_clip 2.x's sequence-first (N, B, C) layout (its token mean over dim 0 would average the
BATCH under open_clip 3.x, which is batch-first); our adapters own the model and expose only
record_attention / embed_hidden, so this is our own implementation from the paper.
Measured on the embedded model (first 50 test pairs, scripts/compare_sota_variants.py): paper vs the
official code's settings (variant code, start_layer -2) rank correlation 0.76 (image); image box
ratio 0.74 (paper) / 0.69 (code) vs random 0.07.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from baselines.attention import record_similarity
from baselines.base import Baseline, image_embedding, text_embedding
from baselines.grad_eclip import VARIANTS
from m2ib.core.attributor import register_method
from m2ib.core.errors import InputError
from m2ib.core.maps import normalise_minmax


@register_method("legrad")
class LeGrad(Baseline):
    """LeGrad (Bousselham et al., ICCV 2025): gradients of every block's own score w.r.t. its attention map.

    Image (and text) maps (module docstring: equations and open choices)."""

    defaults = {"start_layer": 0, "variant": "paper"}

    @classmethod
    def check_values(cls, hp):
        if hp["variant"] not in VARIANTS:
            raise InputError(f"method {cls.name!r}: variant must be one of {VARIANTS}, got {hp['variant']!r}")

    def setup(self):
        start, low = self.hparams["start_layer"], min(self.adapter.num_layers[m] for m in self.modalities)
        if isinstance(start, bool) or not isinstance(start, int) or not -low <= start < low:
            raise InputError(f"method {self.name!r}: start_layer must be an integer in {-low}..{low - 1} for "
                             f"{self.adapter.name}, got {start!r}")

    def _values(self, modality, pixels, text):
        """(B, N) summed per-layer LeGrad values over the key positions of the tower's hidden state."""
        inputs = pixels if modality == "image" else text
        other = text_embedding(self.adapter, text) if modality == "image" else image_embedding(self.adapter, pixels)
        _, attn, parts = record_similarity(self, modality, pixels, text, grad=True, parts=True)
        start = self.hparams["start_layer"] % len(attn)
        valid = self.adapter.token_positions(modality, inputs).to(other.device)
        total = 0.0
        with torch.enable_grad():
            for a, p in zip(attn[start:], parts[start:]):
                hidden = p["hidden"]
                if self.hparams["variant"] == "code":     # mean over the real tokens, at every position
                    m = valid[..., None].to(hidden.dtype)
                    hidden = ((hidden * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)).expand_as(hidden)
                s = (self.adapter.embed_hidden(modality, hidden, inputs) * other).sum(-1)
                g = torch.autograd.grad(s.sum(), a, retain_graph=True)[0].float()
                if modality == "text":
                    g = g * (a.detach() > 0)
                rows = F.relu(g).mean(1) * valid[:, :, None]           # (B, N, N): mean over heads
                total = total + rows.sum(1) / valid.sum(1, keepdim=True)   # mean over the real query rows
        return total * valid

    def explain_image(self, pixels, text, seeds):
        return normalise_minmax(self.adapter.hidden_to_image_map(self._values("image", pixels, text)))

    def explain_text(self, pixels, text, seeds):
        return self.adapter.hidden_to_text_scores(self._values("text", pixels, text), text)
