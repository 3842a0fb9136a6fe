"""M2IB as an Attributor: one bottleneck per modality, each explained against the other modality's
clean embedding (Wang et al. 2023, Sec. 3)."""
from __future__ import annotations

import torch

from m2ib.core.attributor import COMMON_DEFAULTS, Attributor, register_method
from m2ib.core.errors import InputError
from m2ib.core.maps import normalise_minmax
from m2ib.core.records import TextBatch
from m2ib.method.bottleneck import M2IBConfig, fit_bottleneck
from m2ib.method.stats import layer_stats


@register_method("m2ib")
class M2IBAttributor(Attributor):
    """M2IB (Wang et al. 2023): per-pair information bottlenecks fitted to the other modality's embedding.

    Hyperparameters: an M2IBConfig (`config=`) or its flat keywords (layer, layers, beta, var, steps,
    copies, lr, init_alpha, each optionally image_/text_ prefixed; mode; ratio; amp; stats). Layers and betas not given
    are the model's (adapter.default_m2ib_settings()). `modalities` picks what to explain. In mode "iba"
    the layer statistics are estimated (or read from their cache) once, at construction.

    image: capacity summed over channels, class token dropped, bilinearly upsampled to the input frame,
    min-max normalised per map (m2ib.core.maps). text: capacity summed over channels per token (nats),
    SOT/EOT/padding zeroed. Raw per-token capacities are kept in meta['image_capacity'] /
    meta['text_capacity'].
    """

    def __init__(self, adapter, config: M2IBConfig | None = None, **hparams):
        if config is not None and set(hparams) - set(COMMON_DEFAULTS):
            raise InputError(f"m2ib: give either config= or keyword hyperparameters, not both "
                             f"(got {sorted(set(hparams) - set(COMMON_DEFAULTS))})")
        if config is not None:
            hparams = {**config.validate().as_flat(), **hparams}
        super().__init__(adapter, **hparams)

    @classmethod
    def check_params(cls, hparams: dict) -> dict:
        common = {k: hparams[k] for k in COMMON_DEFAULTS if k in hparams}
        merged = super().check_params(common)   # modalities, progress
        own = {k: v for k, v in hparams.items() if k not in COMMON_DEFAULTS}
        M2IBConfig.from_kwargs(**own)            # types, ranges, unknown keys
        return {**merged, **own}

    def setup(self) -> None:
        own = {k: v for k, v in self.hparams.items() if k not in COMMON_DEFAULTS}
        self.config = M2IBConfig.from_kwargs(**own).with_model_defaults(self.adapter.default_m2ib_settings())
        for m in self.modalities:
            layers = self.config.for_modality(m).bottleneck_layers
            for layer in layers:
                self.adapter.check_layer(m, layer)
            for start, stop in zip(layers, layers[1:]):     # several layers: the adapter must pass between them
                self.adapter.check_block_span(m, start, stop)
        self.stats = {}
        if self.config.mode == "iba":
            self.stats = {m: {layer: layer_stats(self.adapter, m, layer, self.config.stats,
                                                 progress=self.hparams["progress"])
                              for layer in self.config.for_modality(m).bottleneck_layers}
                          for m in self.modalities}

    def identity(self) -> dict:
        return {**self.config.as_flat(), "modalities": list(self.modalities)}

    def explain(self, pixels: torch.Tensor, text: TextBatch, seeds: list[int]):
        cfg, ad = self.config, self.adapter
        inputs = {"image": pixels, "text": text}
        with torch.no_grad():
            # an explained modality's clean encode passes its first bottleneck layer: keep that hidden state
            # for fit_bottleneck instead of running blocks 0..l again
            hidden = {m: ad.prefix(m, inputs[m], cfg.for_modality(m).bottleneck_layers[0]) for m in self.modalities}
            emb = {m: ad.suffix(m, hidden[m], inputs[m], cfg.for_modality(m).bottleneck_layers[0]) if m in hidden
                   else ad.encode(m, inputs[m]) for m in ("image", "text")}
        image_map = text_scores = None
        meta = {"image_fitting": None, "text_fitting": None}
        if "image" in self.modalities:
            res = fit_bottleneck(ad, "image", pixels, emb["text"], cfg.image, cfg.mode, seeds, cfg.amp,
                                 self.stats.get("image"), hidden=hidden["image"])
            image_map = normalise_minmax(ad.hidden_to_image_map(res.capacity))
            meta.update(image_capacity=res.capacity.cpu(), image_fitting=res.fitting.cpu())
        if "text" in self.modalities:
            res = fit_bottleneck(ad, "text", text, emb["image"], cfg.text, cfg.mode, seeds, cfg.amp,
                                 self.stats.get("text"), hidden=hidden["text"])
            text_scores = ad.hidden_to_text_scores(res.capacity, text)
            meta.update(text_capacity=res.capacity.cpu(), text_fitting=res.fitting.cpu())
        meta["similarity"] = (emb["image"] * emb["text"]).sum(-1).cpu()
        return image_map, text_scores, meta
