"""NIB, the Narrowing Information Bottleneck (Zhu, Jin, Zhang, Yang, Huang, Zhou & Chen, ICLR 2025,
"Narrowing Information Bottleneck Theory for Multimodal Image-Text Representations Interpretability";
release LMBTough/NIB, read by us for facts only).

What it computes
----------------
NIB keeps M2IB's bottleneck site (the hidden state R after block l of the explained tower, every real
token position) but removes what makes M2IB random and tuned: the noise (eps = 0, so the bottleneck is
Z(lambda) = lambda * R) and the compression term with its beta (nothing is optimised). Instead the
bottleneck is narrowed deterministically, lambda going from 1 (everything flows) to 0 (nothing flows),
and the similarity's gradient is accumulated along the way:

    A = R * (1/m) * sum_{k=1..m} grad_Z s(Z) |_{Z = (k/m) R}          (elementwise, tokens x channels)

s = adapter.similarity's cosine of the normalised embeddings, with the OTHER modality's clean embedding
held fixed (a constant of the pair); the suffix of the tower (adapter.suffix) maps Z to the embedding.
This is a right-Riemann sum of the path integral of grad s along the straight line from 0 to R, i.e.
Integrated Gradients on the hidden state with a zero baseline. The map of a token is A summed over
channels. Both modalities are explained the same way, each against the other's clean embedding.

Completeness (sum(A) = s(R) - s(0) in the limit) holds only slowly here: the first LayerNorm of the
suffix is scale-invariant except within ~sqrt(eps) of zero, so s(lambda R) is nearly flat in lambda and
then jumps for lambda below ~1e-2; m uniform nodes never resolve that jump. Measured on the embedded
model (50 test pairs, the model's layers): median |sum(A) - (s(R) - s(0))| / |s(R) - s(0)| = 0.68 / 0.55
/ 0.61 (image) and 0.61 / 0.50 / 0.43 (text) for m = 10 / 50 / 200; against s(R) - s(R/m) it is
0.03-0.11. NIB with the release's m = 10 thus explains, in effect, s(R) - s(R/10).

Provenance of the equations: the paper's method section could not be read in this environment (only
its abstract, a third-party summary reporting its ablation choosing num_steps = 10, and the release);
the formula above restates the noise-free, beta-free narrowing as the release computes it
(salicncy/nib.py: x = hs * i / n for i = 1..n, attribution += hs * grad / n, summed over channels).
No equation numbers are cited for that reason. tests/test_methods_nib.py compares this module with an
explicit per-pair, per-step loop through open_clip's own forward (a hook scales block l's output).

Choices the paper leaves open, and ours
---------------------------------------
- Layer: image_layer / text_layer in this project's convention (hidden state AFTER block l, 0-based).
  null = the model's M2IB layer (adapter.default_m2ib_settings(): 9 for ViT-B/32), the site NIB
  redefines. The release's `target_layer=9` is the hidden state INTO block 9, i.e. after block 8, one
  block earlier than the M2IB it compares with (whose layer 9 is the output of block 9, in the same
  repository): release_layers=true applies that reading (layer - 1; layer 0 then has no valid site).
  Measured on the embedded model (50 test pairs, layer 1 vs 0): mean Spearman between the two variants'
  maps 0.25 (image), 0.28 (text), so the choice matters.
- Steps m = 10 (the release's default), right-Riemann nodes k/m, k = 1..m (the release's); lambda = 0
  itself is never evaluated.
- Positions narrowed: every real token position (image: class token and patches; text: start..end of
  text, no padding, adapter.token_positions); padding keeps its value (it cannot reach the pooled token).
- Target for a text-image pair: the cosine similarity of the normalised embeddings (not CLIP's scaled
  logit; the release also uses the cosine).
- Image map: class token dropped, patch grid bilinearly upsampled to the input frame
  (adapter.hidden_to_image_map), min-max normalised per map (m2ib.core.maps), as the release does.
- Text scores: the signed per-token sums, unnormalised (the release min-max normalises its text map
  over start..end of text; the library keeps raw text scores for every method and masks them to the
  word tokens). Raw per-token attributions are kept in meta['image_attribution'/'text_attribution'].
"""
from __future__ import annotations

import numpy as np
import torch

from baselines.base import image_embedding, positive_int, text_embedding
from m2ib.core.attributor import MODALITIES, Attributor, register_method
from m2ib.core.errors import InputError
from m2ib.core.maps import normalise_minmax


def narrowing_attribution(adapter, modality: str, inputs, target: torch.Tensor, layer: int,
                          steps: int) -> torch.Tensor:
    """(B, N) per-token NIB attribution (summed over channels) of the hidden state after block `layer`,
    explaining the cosine to `target` (B, D); all m narrowing steps of all pairs in one suffix call."""
    with torch.no_grad():
        hidden = adapter.prefix(modality, inputs, layer).float()
    valid = adapter.token_positions(modality, inputs)[:, : hidden.shape[1]]
    B, N, C = hidden.shape
    lam = torch.arange(1, steps + 1, device=hidden.device, dtype=hidden.dtype) / steps   # k / m
    scale = torch.where(valid[:, None, :, None], lam[None, :, None, None], torch.ones((), device=hidden.device))
    z = (scale * hidden[:, None]).reshape(B * steps, N, C).requires_grad_(True)
    with torch.enable_grad():
        emb = adapter.suffix(modality, z, inputs, layer)
        score = (emb.float() * target.detach().float().repeat_interleave(steps, 0)).sum()
        grad, = torch.autograd.grad(score, z)
    mean_grad = grad.reshape(B, steps, N, C).mean(1)
    return (hidden * mean_grad * valid[..., None]).sum(-1)


@register_method("nib")
class NarrowingBottleneck(Attributor):
    """NIB (Zhu et al., ICLR 2025): M2IB's bottleneck without noise, narrowed from 0 to 1 (IG on layer l).

    Module docstring: equations and open choices. Hyperparameters: image_layer / text_layer (null: the
    model's M2IB layer), release_layers (false; true: the layer is read as the release's target_layer, the hidden state
    entering that block, i.e. layer - 1 here), steps (10)."""

    defaults = {"image_layer": None, "text_layer": None, "release_layers": False, "steps": 10}

    @classmethod
    def check_values(cls, hp):
        positive_int(cls.name, "steps", hp["steps"])

    def setup(self):
        own = self.adapter.default_m2ib_settings()
        self.layers = {}
        for m in MODALITIES:
            given = self.hparams[f"{m}_layer"]
            layer = own[f"{m}_layer"] if given is None else given
            if self.hparams["release_layers"] and isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
                if layer == 0 and m in self.modalities:
                    raise InputError(f"method 'nib': release_layers reads the input of block l, and {m} layer 0's "
                                     "input is the embedding, not a block output; use layer >= 1 or release_layers=false")
                layer -= 1
            self.layers[m] = self.adapter.check_layer(m, layer) if m in self.modalities else layer

    def identity(self):
        return {**super().identity(), **{f"{m}_layer": self.layers[m] for m in MODALITIES}}

    def explain(self, pixels, text, seeds):
        image = scores = None
        meta = {}
        if "image" in self.modalities:
            values = narrowing_attribution(self.adapter, "image", pixels, text_embedding(self.adapter, text),
                                           self.layers["image"], self.hparams["steps"])
            image = normalise_minmax(self.adapter.hidden_to_image_map(values))
            meta["image_attribution"] = values.detach().cpu()
        if "text" in self.modalities:
            values = narrowing_attribution(self.adapter, "text", text, image_embedding(self.adapter, pixels),
                                           self.layers["text"], self.hparams["steps"])
            scores = self.adapter.hidden_to_text_scores(values, text)
            meta["text_attribution"] = values.detach().cpu()
        return image, scores, meta
