"""Adapter for open_clip CLIPs with a ModifiedResNet image tower (RN50, RN101, RN50x4, ...) and an open_clip
text transformer (the text half is OpenClipTextTower, shared with the ViT and timm-tower adapters).

Image layers are the four residual stages, not the stem: layer l (0-based) is the feature map after
open_clip's `layer{l+1}`, i.e. after conv2_x .. conv5_x in the ResNet paper's naming, at strides
4, 8, 16, 32. The stem (three convolutions + average pool) always runs in the prefix: it is no
residual stage, and IBA (Schulz et al., ICLR 2020) bottlenecks stage outputs of ResNet-50.
No M2IB setting is published for a ResNet CLIP; the default image layer is IBA's: its release's
ResNet-50 notebook (BioroboticsLab/IBA, notebooks/pytorch_IBA.ipynb) wraps torchvision's `model.layer2`,
the conv3_x output that feeds conv4_1, which is layer 1 here (28 x 28 at 224 px). Text layer and
betas follow the project's rule (ModelAdapter.default_m2ib_settings).

Tokens are the spatial positions of the stage's feature map, row-major: prefix returns (B, H*W, C)
with no prefix tokens (num_prefix = 0). The grid depends on the layer (stage_grids[l]); image maps
find it from the number of tokens, which differs for every stage. `grid_size` is the last stage's
grid, the one the attention pool reads (the analogue of a ViT's patch grid: tiles and occlusion
windows of one cell each).

Every position of every stage, the last one included, reaches the embedding through the attention
pool (its query is the mean of all positions and it attends to all of them), so the last stage is a
valid bottleneck layer here (last_valid_layer), unlike a ViT's last block, and no single position is
pooled (pooled_position None). The residual stages have no attention between positions:
attention-based methods (raw attention, rollout, Chefer, Grad-ECLIP, LeGrad, FastIG) refuse the image
tower in one line and explain the text tower as for a ViT CLIP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2ib.core.errors import InputError, UnsupportedError
from m2ib.models.base import ModelAdapter, register_family
from m2ib.models.open_clip_vit import OpenClipTextTower, has_open_clip_text


#: The image layer M2IB uses when the model has no published setting: IBA's ResNet-50 position (above).
IBA_IMAGE_LAYER = 1


@register_family
class OpenClipResNetAdapter(OpenClipTextTower, ModelAdapter):
    family = "open_clip_resnet"

    @classmethod
    def serves(cls, model) -> bool:
        return type(getattr(model, "visual", None)).__name__ == "ModifiedResNet" and has_open_clip_text(model)
    num_prefix = 0

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self._wrap(model, preprocess, tokenizer, name, device)
        v = self.model.visual
        if type(v).__name__ != "ModifiedResNet":
            raise UnsupportedError(f"{name}: image tower {type(v).__name__} is not an open_clip ModifiedResNet")
        self.visual = v
        self._init_text_tower()
        self.stages = [v.layer1, v.layer2, v.layer3, v.layer4]
        size = v.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.stage_grids = _stage_grids(self.image_size, len(self.stages))
        self.grid_size = self.stage_grids[-1]
        cfg = getattr(v, "preprocess_cfg", {}) or {}
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.num_layers = {"image": len(self.stages), "text": len(self.text.blocks)}

    # ---- layers -----------------------------------------------------------------------------------
    def default_m2ib_settings(self) -> dict:
        out = super().default_m2ib_settings()
        out["image_layer"] = self.m2ib_defaults.get("image_layer", IBA_IMAGE_LAYER)
        return out

    def last_valid_layer(self, modality: str) -> int:
        """Image: the last stage too (the attention pool reads every one of its positions)."""
        return self.num_layers["image"] - 1 if modality == "image" else super().last_valid_layer("text")

    def pooled_position(self, modality: str, inputs):
        """Image: None (the attention pool's query is the mean of all positions); text: as the ViT CLIP."""
        return None if modality == "image" else self._text_pooled_position(inputs)

    def token_grid(self, n_tokens: int) -> tuple[int, int]:
        """The stage grid with n_tokens positions (the grids of the stages all differ in size)."""
        for grid in self.stage_grids:
            if grid[0] * grid[1] == n_tokens:
                return grid
        raise InputError(f"{self.name}: {n_tokens} image positions match no stage of the ResNet "
                         f"(grids {self.stage_grids})")

    # ---- split encoders ---------------------------------------------------------------------------
    def prefix(self, modality: str, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        if modality == "text":
            return self._text_prefix(inputs, layer)
        x = self.visual.stem(inputs)
        for stage in self.stages[: layer + 1]:
            x = stage(x)
        return x.flatten(2).transpose(1, 2)

    def suffix(self, modality: str, hidden: torch.Tensor, inputs, layer: int) -> torch.Tensor:
        layer = self.check_layer(modality, layer)
        if modality == "text":
            return self._text_suffix(hidden, inputs, layer)
        gh, gw = self.stage_grids[layer]
        if hidden.shape[1] != gh * gw:
            raise InputError(f"{self.name}: the hidden state after image layer {layer} has {gh * gw} "
                             f"positions ({gh}x{gw}), got {hidden.shape[1]}")
        x = hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], gh, gw)
        for stage in self.stages[layer + 1:]:
            x = stage(x)
        return F.normalize(self.visual.attnpool(x), dim=-1)

    def token_positions(self, modality: str, inputs) -> torch.Tensor:
        """Image: every position is real; the row has the first stage's (largest) number of positions
        and callers cut it to their hidden state's length (prefix() at any layer)."""
        if modality == "image":
            gh, gw = self.stage_grids[0]
            return torch.ones(inputs.shape[0], gh * gw, dtype=torch.bool, device=self.device)
        return super().token_positions(modality, inputs)

    # ---- hooks --------------------------------------------------------------------------------------
    supports_attention_parts = True     # the text tower's (the image tower is refused below)

    def record_attention(self, modality: str, parts: bool = False):
        if modality == "image":
            raise UnsupportedError(
                f"model {self.name}: its image tower is a convolutional ModifiedResNet whose stages have no "
                f"attention between positions (only the final attention pool attends), so attention-based "
                f"methods cannot explain its images; use modalities=[text] or another method")
        return super().record_attention(modality, parts=parts)

    def check_block_span(self, modality: str, start: int, stop: int) -> tuple[int, int]:
        """Image: refused. Several bottleneck layers share one damping ratio (multi-layer M2IB), which
        needs one shape for all of them, and the stages differ in grid and channels."""
        if modality == "image":
            raise UnsupportedError(
                f"model {self.name}: a bottleneck over several image layers shares one damping ratio, but its "
                f"ResNet stages differ in grid ({', '.join(f'{h}x{w}' for h, w in self.stage_grids)}) and channels; "
                f"use one image_layer")
        return super().check_block_span(modality, start, stop)

    def embed_hidden(self, modality: str, hidden: torch.Tensor, inputs) -> torch.Tensor:
        """Text: as the ViT CLIP. Image: refused (base class): a stage before the last has another width
        than the attention pool's input, so there is no embedding of an intermediate stage."""
        if modality == "image":
            return super().embed_hidden(modality, hidden, inputs)
        return self._text_embed_hidden(hidden, inputs)

    def gradcam_target(self, modality: str):
        """Image: the last bottleneck block of the last stage (pytorch-grad-cam's usual ResNet target,
        model.layer4[-1]); its (B, C, H, W) output needs no reshaping. Text: as for the ViT adapter."""
        if modality == "image":
            return self.visual.layer4[-1], lambda t: t
        return super().gradcam_target(modality)

    def _blocks(self, modality: str):
        return self.stages if modality == "image" else self.text.blocks

    def randomization_order(self, modality: str):
        """Image: the attention pool (projection), then layer4 .. layer1, then the stem."""
        if modality == "text":
            return self._text_randomization()
        v = self.visual
        groups = [("image.attnpool", list(v.attnpool.parameters()))]
        groups += [(f"image.layer{i + 1}", list(self.stages[i].parameters()))
                   for i in reversed(range(len(self.stages)))]
        stem = [p for m in (v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3) for p in m.parameters()]
        return groups + [("image.stem", stem)]


def _stage_grids(image_size: tuple[int, int], n_stages: int) -> list[tuple[int, int]]:
    """Feature-map grid after each stage: the stem's stride-2 3x3 convolution (padding 1) and 2x2
    average pool, then stride 2 (an average pool) at every stage after the first."""
    h, w = ((s + 1) // 2 // 2 for s in image_size)
    grids = [(h, w)]
    for _ in range(1, n_stages):
        h, w = h // 2, w // 2
        grids.append((h, w))
    return grids
