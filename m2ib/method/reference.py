"""A plain re-statement of the released M2IB algorithm: the yardstick the fast path is tested against.

Deliberately naive, like the release: one pair at a time, both full encoders re-run at every step
through open_clip's own forward (the bottleneck is a forward hook on block l), weights left
trainable (their gradients are computed and thrown away), text run UNPADDED, SOT..EOT only, and
bottlenecked there (the release tokenises without padding; open_clip's CLIP forward adds a 77-row
positional embedding and mask, so the copy's are cut to the caption's length). It is therefore also the
release's COST, the baseline scripts/bench_m2ib.py reports speed-ups against.
Several layers (config *_layers, CoIBA-style): one alpha, hooked on every listed block, the information
term taken at the first. Estimators: the release's (none), or IBA's per-sample bottleneck written as IBA writes it (Schulz et al.
2020, Sec. 3.1): given a mean m and std s of R, noise epsilon = s * eps + m, Z = lambda R + (1 - lambda)
epsilon, capacity KL(N(lambda (R - m) / s, (1 - lambda)^2) || N(0, 1)). With the data set's statistics that
is mode "iba" (var 1), with m = 0, s = sqrt(var) mode "paper". Never used by the library's hot path.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from m2ib.method.bottleneck import M2IBConfig, pair_generators


def _text_blocks(model):
    return model.transformer.resblocks if hasattr(model, "transformer") else model.text.transformer.resblocks


def _cut_text_context(model, length: int) -> None:
    """Shorten a (copied) open_clip text tower's context to `length` positions, so its own encode_text runs
    an unpadded caption of that length: positional embedding (kept trainable) and causal mask cut."""
    t = model if hasattr(model, "transformer") else model.text
    t.positional_embedding = torch.nn.Parameter(t.positional_embedding[:length].detach().clone())
    if t.attn_mask is not None:
        t.attn_mask = t.attn_mask[:length, :length]


def reference_pair(model, pixels: torch.Tensor, ids: torch.Tensor, eot: int, config: M2IBConfig, seed: int,
                   modalities=("image", "text"), estimators: dict | None = None) -> dict:
    """Capacity per token (summed over channels) of one pair, per modality: {'image': (N,), 'text': (eot+1,)}.

    model: an open_clip CLIP (causal text tower pooling its EOT); pixels (1, 3, H, W); ids (1, context) token
    ids, cut here to SOT..EOT; eot: EOT index.
    estimators: {modality: (mean, std)} tensors broadcasting against the hooked (copies, n, C) state, for
    IBA's bottleneck; a modality left out uses the release's. Noise comes from the same per-pair generators
    as the fast path, so both can be compared exactly.
    """
    if any(v is None for m in modalities for v in (config.for_modality(m).layer, config.for_modality(m).beta)):
        raise ValueError("reference_pair needs explicit layers and betas (M2IBConfig.with_model_defaults)")
    model = copy.deepcopy(model).eval()
    _cut_text_context(model, eot + 1)
    ids = ids[:, : eot + 1]
    for p in model.parameters():
        p.requires_grad_(True)
    out = {}
    for modality in modalities:
        hp = config.for_modality(modality)
        gen = pair_generators([seed], modality, pixels.device)[0]
        blocks = model.visual.transformer.resblocks if modality == "image" else _text_blocks(model)
        layers = hp.bottleneck_layers
        if len(layers) > 1 and modality in (estimators or {}):
            raise ValueError("reference_pair restates several layers with the release's estimator only")
        state = {}

        def hook(module, args, output, first):
            n = output.shape[1]
            r = output
            if "alpha" not in state:
                width = r.shape[-1] if hp.ratio == "token_channel" else 1
                state["alpha"] = torch.nn.Parameter(torch.full((1, n, width), float(hp.init_alpha),
                                                               device=r.device))
                state["opt"] = torch.optim.Adam([state["alpha"]], lr=hp.lr)
            lam = torch.sigmoid(state["alpha"]).expand_as(r)
            eps = torch.randn(r.shape, generator=gen, device=r.device)
            if modality in (estimators or {}):
                mean, std = estimators[modality]
                mu_z, var_z = lam * (r - mean) / std, (1 - lam) ** 2
                kl = -0.5 * (1 + torch.log(var_z) - mu_z ** 2 - var_z)
                z = lam * r + (1 - lam) * (std * eps + mean)
            else:
                # KL(N(lam r, (1 - lam)^2) || N(0, 1)), written independently of bottleneck.capacity
                kl = 0.5 * ((1 - lam) ** 2 + (lam * r) ** 2 - 1) - torch.log(1 - lam)
                z = lam * r + (1 - lam) * eps
            if first:       # several layers (CoIBA): the information term is the first layer's
                state["kl"] = kl
            return z

        # the same alpha at every listed block; hooks fire in block order, so noise is drawn layer by layer
        handles = [blocks[l].register_forward_hook(functools.partial(hook, first=l == layers[0])) for l in layers]
        try:
            for _ in range(hp.steps):
                img = F.normalize(model.encode_image(pixels.repeat(hp.copies, 1, 1, 1)), dim=-1)
                txt = F.normalize(model.encode_text(ids.repeat(hp.copies, 1)), dim=-1)
                loss = hp.beta * state["kl"].mean() - (img * txt).sum(-1).mean()
                state["opt"].zero_grad()
                model.zero_grad(set_to_none=True)
                loss.backward()
                state["opt"].step()
        finally:
            for handle in handles:
                handle.remove()
        out[modality] = state["kl"].detach().mean(0).sum(-1)
    return out
