"""Adapter for open_clip CustomTextCLIP models with a timm image tower and an open_clip text
transformer: SigLIP ('ViT-B-16-SigLIP': timm ViT without class token, attention-pool head 'map';
bidirectional text tower pooling the last position, SentencePiece tokenizer from the Hub) and EVA02
('EVA02-B-16': timm Eva with class token and rotary position embedding in every block; causal CLIP
text tower with EOT pooling and open_clip's BPE tokenizer), and any open_clip config of that shape.

It is the two tower halves put together: TimmImageTower (open_clip_hf) and OpenClipTextTower
(open_clip_vit). Facts it relies on (read from open_clip 3.x / timm 1.x):
- SigLIP's image embedding reads every patch token through the attention-pool head, so every
  position of the last block's output reaches it: the last block is a valid bottleneck layer there,
  and attention baselines and Grad-ECLIP, which read one pooled token's attention row or query,
  refuse SigLIP's image tower (pooled_position None); LeGrad, which only needs embed_hidden (the
  attention-pool head applied to any block's output), explains it.
- SigLIP's text tower has no causal mask and no padding mask and pools position context - 1 (a
  padding position): it runs on the full context and every position is a bottleneck position.
"""
from __future__ import annotations

import torch

from m2ib.models.base import ModelAdapter, register_family
from m2ib.models.open_clip_hf import TimmImageTower, is_timm_vit
from m2ib.models.open_clip_vit import OpenClipTextTower, has_open_clip_text


@register_family
class OpenClipTimmAdapter(TimmImageTower, OpenClipTextTower, ModelAdapter):
    """open_clip CustomTextCLIP: timm ViT/Eva image tower + open_clip TextTransformer."""

    family = "open_clip_timm"

    @classmethod
    def serves(cls, model) -> bool:
        return is_timm_vit(getattr(model, "visual", None)) and has_open_clip_text(model)

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self._wrap(model, preprocess, tokenizer, name, device)
        self._init_image_tower()
        self._init_text_tower()
        self.num_layers = {"image": len(self.trunk.blocks), "text": len(self.text.blocks)}

    def last_valid_layer(self, modality: str) -> int:
        return self._image_last_valid_layer() if modality == "image" else super().last_valid_layer("text")

    def pooled_position(self, modality: str, inputs):
        return self._image_pooled_position(inputs) if modality == "image" else self._text_pooled_position(inputs)

    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        return self._image_prefix(inputs, layer) if modality == "image" else self._text_prefix(inputs, layer)

    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        return self._image_suffix(hidden, layer) if modality == "image" else self._text_suffix(hidden, inputs, layer)

    # ---- hooks -----------------------------------------------------------------------------------------
    supports_attention_parts = True     # both towers' blocks are written out (run_timm_block, run_block)

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        return self._image_head(hidden) if modality == "image" else self._text_embed_hidden(hidden, inputs)

    def _blocks(self, modality: str):
        return self.trunk.blocks if modality == "image" else self.text.blocks

    def randomization_order(self, modality: str):
        return self._image_randomization() if modality == "image" else self._text_randomization()
