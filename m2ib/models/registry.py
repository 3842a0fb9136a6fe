"""Build a model adapter from a model name and a weights source, with clear offline errors.

name: an open_clip config name (built-in such as 'ViT-B-32', or one of this project's configs in
m2ib/model_configs/, registered here). pretrained: None (random weights from `seed`), an open_clip
tag such as 'openai', or a path to a local checkpoint file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from m2ib.errors import ModelUnavailableError, InputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False


def register_project_configs() -> None:
    """Make the project's small open_clip configs (m2ib/model_configs/*.json) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def load_adapter(name: str = "m2ib-tiny-vit", pretrained: Optional[str] = None, device: str = "cpu",
                 seed: int = 0):
    """An adapter for `name` with weights from `pretrained`; see the module docstring."""
    import open_clip
    from m2ib.models.open_clip_vit import OpenClipViTAdapter

    register_project_configs()
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise InputError(f"unknown model {name!r}: not an open_clip config nor one of {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}")
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise ModelUnavailableError(
                f"checkpoint file {pretrained} for model {name} does not exist; put the file there or "
                f"point the config key model.pretrained at it")
    torch.manual_seed(seed)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    except (RuntimeError, OSError, ValueError) as exc:
        if pretrained:
            raise ModelUnavailableError(
                f"could not load weights {pretrained!r} for {name}: {exc}\n"
                f"Offline? Download them on a connected machine with "
                f"python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\" "
                f"and copy the Hugging Face cache (~/.cache/huggingface) here, or set model.pretrained to a "
                f"local checkpoint file") from exc
        raise
    tokenizer = open_clip.get_tokenizer(name)
    return OpenClipViTAdapter(model, preprocess, tokenizer, name=name, device=device)
