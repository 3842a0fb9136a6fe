"""Gradient baselines: Saliency, gradient x input, Integrated Gradients (captum) and Grad-CAM
(pytorch-grad-cam), on the image pixels and on the text token embeddings.

All explain s = cos(e_image, e_text) with the other modality's embedding fixed (see _common).
Text gradients are taken w.r.t. the token embeddings of adapter.embed_tokens (before position
embeddings), which is what captum's LayerIntegratedGradients on the embedding layer computes,
without touching the layer itself. Only positions up to the last end-of-text token are run.
"""
from __future__ import annotations

import numpy as np
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

from baselines.base import (Baseline, embedding_score_fn, image_embedding, image_score_fn,
                               positive_int, text_embedding, text_length)
from m2ib.core.attributor import register_method
from m2ib.core.errors import InputError


def _token_embeddings(adapter, text):
    """(B, L, C) input token embeddings, trimmed to the positions the text encoder reads."""
    return adapter.embed_tokens(text)[:, : text_length(adapter, text)].detach()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy that requires grad (adapter weights are frozen: gradients go to inputs)."""
    return x.detach().clone().requires_grad_(True)


@register_method("saliency")
class SaliencyMap(Baseline):
    """|d s / d x| (Simonyan et al. 2014). Image: max over colour channels of |gradient| per
    pixel, as in the paper. Text: L2 norm of the gradient over the embedding dimension per token."""

    def explain_image(self, pixels, text, seeds):
        score = image_score_fn(self.adapter, text_embedding(self.adapter, text))
        with torch.enable_grad():
            grads = Saliency(score).attribute(_leaf(pixels), abs=True)
        return grads.amax(dim=1)

    def explain_text(self, pixels, text, seeds):
        emb = _token_embeddings(self.adapter, text)
        score = embedding_score_fn(self.adapter, text, image_embedding(self.adapter, pixels))
        with torch.enable_grad():
            grads = Saliency(score).attribute(_leaf(emb), abs=True)
        return self.adapter.hidden_to_text_scores(grads.norm(dim=-1), text)


@register_method("grad_x_input")
class GradientXInput(Baseline):
    """Gradient x input (Shrikumar et al. 2016), summed over colour channels (image) or over the
    embedding dimension (text). Signed: positive = evidence for the match."""

    def explain_image(self, pixels, text, seeds):
        score = image_score_fn(self.adapter, text_embedding(self.adapter, text))
        with torch.enable_grad():
            attr = InputXGradient(score).attribute(_leaf(pixels))
        return attr.sum(dim=1)

    def explain_text(self, pixels, text, seeds):
        emb = _token_embeddings(self.adapter, text)
        score = embedding_score_fn(self.adapter, text, image_embedding(self.adapter, pixels))
        with torch.enable_grad():
            attr = InputXGradient(score).attribute(_leaf(emb))
        return self.adapter.hidden_to_text_scores(attr.sum(dim=-1), text)


@register_method("integrated_gradients")
class IntegratedGradientsMap(Baseline):
    """Integrated Gradients (Sundararajan et al. 2017) via captum, summed over channels / embedding
    dimension (so a pair's scores add up to about s(x) - s(baseline), IG's completeness).

    Baselines: image = zeros in the normalised frame (the preprocessing mean colour); text = every
    word token replaced by the blank token's embedding (start/end of text and padding kept).

    Hyperparameters: n_steps (20; the paper's 50-300 is too slow for a 2-core CPU, the Gauss-Legendre
    rule keeps the error moderate), method ('gausslegendre'), batch_size (rows per forward, 64).
    """

    defaults = {"n_steps": 20, "method": "gausslegendre", "batch_size": 64}

    @classmethod
    def check_values(cls, hp):
        positive_int(cls.name, "n_steps", hp["n_steps"])
        positive_int(cls.name, "batch_size", hp["batch_size"])
        allowed = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
        if hp["method"] not in allowed:
            raise InputError(f"method {cls.name!r}: hyperparameter method must be one of {allowed}, "
                             f"got {hp['method']!r}")

    def _ig(self, fn, inputs, baselines):
        rows = max(self.hparams["batch_size"], 2 * inputs.shape[0])
        with torch.enable_grad():
            return IntegratedGradients(fn).attribute(_leaf(inputs), baselines=baselines, n_steps=self.hparams["n_steps"],
                                                     method=self.hparams["method"], internal_batch_size=rows)

    def explain_image(self, pixels, text, seeds):
        score = image_score_fn(self.adapter, text_embedding(self.adapter, text))
        return self._ig(score, pixels, torch.zeros_like(pixels)).sum(dim=1)

    def explain_text(self, pixels, text, seeds):
        emb = _token_embeddings(self.adapter, text)
        blank = text.with_blanks(torch.ones_like(text.word_mask), self.adapter.blank_token_id)
        base = _token_embeddings(self.adapter, blank)
        score = embedding_score_fn(self.adapter, text, image_embedding(self.adapter, pixels))
        return self.adapter.hidden_to_text_scores(self._ig(score, emb, base).sum(dim=-1), text)


class _ScoreModule(nn.Module):
    """pytorch-grad-cam wants an nn.Module with parameters (it reads their device); this wraps the
    score function. Its input is made to require grad so that, with frozen weights, a graph exists
    and the target layer's output gradient can be hooked."""

    def __init__(self, fn, device):
        super().__init__()
        self.fn = fn
        self.device_anchor = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)

    def forward(self, x):
        return self.fn(x.detach().requires_grad_(True))


@register_method("gradcam")
class GradCAMMap(Baseline):
    """Grad-CAM (Selvaraju et al. 2017) with pytorch-grad-cam on adapter.gradcam_target(modality):
    a block BEFORE the last one (after the last block only the pooled token reaches the embedding,
    so the other tokens get zero gradient), its tokens reshaped to the patch grid (image) or to a
    1 x L strip of token positions (text). The library ReLUs and min-max normalises each map."""

    def _cam(self, module, reshape, fn, inputs, device):
        from pytorch_grad_cam import GradCAM

        targets = [lambda out: out for _ in range(inputs.shape[0])]
        with torch.enable_grad(), GradCAM(model=_ScoreModule(fn, device), target_layers=[module],
                                          reshape_transform=reshape) as cam:
            maps = cam(input_tensor=inputs, targets=targets)
        return torch.from_numpy(np.ascontiguousarray(maps)).to(device)

    def explain_image(self, pixels, text, seeds):
        module, reshape = self.adapter.gradcam_target("image")
        score = image_score_fn(self.adapter, text_embedding(self.adapter, text))
        return self._cam(module, reshape, score, pixels, pixels.device)

    def explain_text(self, pixels, text, seeds):
        """Pair by pair: Grad-CAM averages gradients over all positions and min-max normalises over
        them, so padding a caption to a longer batch neighbour's length would change its scores."""
        module, reshape = self.adapter.gradcam_target("text")
        out = []
        for b in self.pairs(len(text), "text"):
            one = text.select([b])
            emb = _token_embeddings(self.adapter, one)
            score = embedding_score_fn(self.adapter, one, image_embedding(self.adapter, pixels[b:b + 1]))
            # The CAM is resized to the input's last two dims: a (1, 1, 1, L) stand-in keeps it at L
            # positions; the embeddings themselves are a constant of the wrapped function.
            stand_in = torch.zeros(1, 1, 1, emb.shape[1], device=emb.device)
            cam = self._cam(module, reshape, lambda _: score(emb.detach().requires_grad_(True)), stand_in,
                            emb.device)
            out.append(self.adapter.hidden_to_text_scores(cam.reshape(1, emb.shape[1]), one)[0])
        return torch.stack(out)
