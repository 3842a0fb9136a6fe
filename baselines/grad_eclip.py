"""Grad-ECLIP (Zhao, Wang, Zeng, Zhao & Chan, "Gradient-based Visual Explanation for Transformer-based
CLIP", ICML 2024; text explanations in "Grad-ECLIP: Gradient-based Visual and Textual Explanations for
CLIP", Zhao, Wang, Hsiao & Chan, arXiv 2502.18816, 2025). Official code: Cyang-Zhao/Grad-Eclip (read
for facts only).

Equations implemented (the ICML paper's Sec. 3, the heat map being its Eqs. 7-8; our notation). S is the explained cosine similarity of the
pair (adapter.similarity; the other modality's embedding is a constant). In a block, the pooled
token's attention output is o = sum_i A_i v_i (per head, before the heads are merged and projected).
- channel weights  w_c = dS / d o^c                     (gradient at the pooled token's row)
- spatial weights  lambda_i = Phi(cos(q_pool, k_i))     ("loosened attention": the softmax is dropped
                   because CLIP's attention is extremely sparse; Phi = min-max normalisation to [0, 1])
- map              H_i = ReLU( sum_c w_c lambda_i v_i^c )
The pooled token is the class token (image), EOT (causal CLIP text) or [CLS] (BERT text):
adapter.pooled_position (towers that pool several positions, e.g. SigLIP's attention-pool head,
have no pooled query and are refused). Image: the last block (`image_layers` = 1). Text: the per-layer sums of the
last `text_layers` blocks are added BEFORE the ReLU (the official text code, 8 of CLIP's 12 text
blocks; clipped to the tower's depth; image_layers > 1 sums the same way).

Choices the paper leaves open (ours):
- Heads. The paper writes one attention over the full width (its code even re-runs the last block
  with ONE head, i.e. explains a different forward than the model's). We keep the model's own
  multi-head forward and apply the equation per head h: lambda^h_i = Phi(cos(q^h_pool, k^h_i)) with
  the head's channels c in h; with one head this is exactly the equation above.
- Phi's range: min-max over the positions the map covers (image: patch tokens, prefix tokens
  excluded, as the official image code does; text: the real tokens SOT..EOT (or [CLS]..[SEP]),
  where the official text code also includes the padding positions).
- Output scale: no normalisation (any positive rescaling leaves every rank-based metric unchanged;
  the paper min-max normalises image maps and the official text code divides by the sum, for display).
- Target of a pair: S = cos(image embedding, text embedding), image map with the text embedding fixed
  and vice versa (the paper explains the same matching score for both).
variant='code' offers the official code's spatial weight, ONE cosine between the full-width pooled
query and each key (all heads concatenated), instead of per head (the code's out-projected q/k for
images and its single-head re-forward are not reproduced: they change the explained model).
Towers without transformer attention (ResNet) are refused with UnsupportedError.
Measured on the embedded model (first 50 test pairs, scripts/compare_sota_variants.py): paper vs
code variant rank correlation 0.84 (image) / 0.78 (text); image box ratio 0.60 vs random 0.07.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from baselines.attention import record_similarity
from baselines.base import Baseline, positive_int, require_pooled_position
from m2ib.core.attributor import register_method
from m2ib.core.errors import InputError

VARIANTS = ("paper", "code")


def minmax_over(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(..., N) values -> min-max normalised over the positions where `valid` (broadcast) is true;
    other positions get 0; a constant row gets ones on its valid positions."""
    big = torch.finfo(values.dtype).max
    lo = torch.where(valid, values, big).amin(-1, keepdim=True)
    hi = torch.where(valid, values, -big).amax(-1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (values - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.ones_like(values))
    return out * valid


@register_method("grad_eclip")
class GradECLIP(Baseline):
    """Grad-ECLIP (Zhao et al., ICML 2024): gradient channel weights x loosened attention x values, ReLU.

    Image and text maps (module docstring: equations and open choices)."""

    defaults = {"image_layers": 1, "text_layers": 8, "variant": "paper"}

    @classmethod
    def check_values(cls, hp):
        positive_int(cls.name, "image_layers", hp["image_layers"])
        positive_int(cls.name, "text_layers", hp["text_layers"])
        if hp["variant"] not in VARIANTS:
            raise InputError(f"method {cls.name!r}: variant must be one of {VARIANTS}, got {hp['variant']!r}")

    def _values(self, modality, pixels, text):
        """(B, N) ReLU'd Grad-ECLIP values on the positions of the tower's hidden state."""
        inputs = pixels if modality == "image" else text
        pooled = require_pooled_position(self.adapter, modality, inputs, self.name)   # refuse before the forward
        score, _, parts = record_similarity(self, modality, pixels, text, grad=True, parts=True)
        pooled = pooled.to(score.device)
        used = parts[-min(self.hparams[f"{modality}_layers"], len(parts)):]
        grads = torch.autograd.grad(score.sum(), [p["out"] for p in used])
        valid = self.adapter.token_positions(modality, inputs).to(score.device)
        if modality == "image":
            valid[:, : self.adapter.num_prefix] = False
        rows = torch.arange(len(pooled), device=score.device)
        total = 0.0
        for p, g in zip(used, grads):
            w = g[rows, :, pooled].detach()                          # (B, heads, head_dim)
            q, k, v = p["q"][rows, :, pooled].detach(), p["k"].detach(), p["v"].detach()
            if self.hparams["variant"] == "paper":
                cos = F.cosine_similarity(q[:, :, None], k, dim=-1)  # (B, heads, N)
            else:
                full_k = k.transpose(1, 2).flatten(2)                # (B, N, heads * head_dim)
                cos = F.cosine_similarity(q.flatten(1)[:, None], full_k, dim=-1)[:, None]
            lam = minmax_over(cos.float(), valid[:, None, : cos.shape[-1]])
            total = total + (lam * (w[:, :, None] * v).sum(-1).float()).sum(1)   # (B, N)
        return F.relu(total)

    def explain_image(self, pixels, text, seeds):
        return self.adapter.hidden_to_image_map(self._values("image", pixels, text))

    def explain_text(self, pixels, text, seeds):
        return self.adapter.hidden_to_text_scores(self._values("text", pixels, text), text)
