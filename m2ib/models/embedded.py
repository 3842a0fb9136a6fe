"""The embedded benchmark's small CLIP (`m2ib-shapes-vit`), committed in m2ib/assets/embedded/ with its
sha256: one model source among the others (model.name=m2ib-shapes-vit, model.pretrained=embedded)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from m2ib.core.errors import ModelUnavailableError
from m2ib.core.paths import missing_asset_message

EMBEDDED_MODEL_NAME = "m2ib-shapes-vit"
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "embedded"
CHECKPOINT = ASSET_DIR / f"{EMBEDDED_MODEL_NAME}.pt"
CHECKPOINT_SHA256 = ASSET_DIR / f"{EMBEDDED_MODEL_NAME}.pt.sha256"
#: Layers chosen on the VALIDATION split (first 100 pairs, release mode, beta 0.1) by image IoU / text AP:
#: image layer 0 / 1 / 2: IoU 0.485 / 0.476 / 0.345; text layer 0 / 1: AP 0.781 / 0.679.
M2IB_SETTINGS = {"image_layer": 0, "text_layer": 0, "image_beta": 0.1, "text_beta": 0.1}


def verify_checkpoint(path: Path = CHECKPOINT) -> str:
    """sha256 of the committed checkpoint, checked against its .sha256 file."""
    if not Path(path).is_file():
        raise ModelUnavailableError(missing_asset_message(path, "the embedded model's checkpoint",
                                                          "retrain it from a clone with `make embedded-model` (~15 min)"))
    if not CHECKPOINT_SHA256.is_file():
        raise ModelUnavailableError(missing_asset_message(CHECKPOINT_SHA256, "the embedded model's checksum file",
                                                          "retrain the model from a clone with `make embedded-model`"))
    expected = CHECKPOINT_SHA256.read_text().split()[0]
    got = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if got != expected:
        raise ModelUnavailableError(f"embedded checkpoint {path} has sha256 {got}, expected {expected} "
                                    f"(from {CHECKPOINT_SHA256}); the file is corrupt or was replaced")
    return got


def load_embedded_adapter(device: str = "cpu"):
    """The committed small CLIP, through the same open_clip path as any real checkpoint."""
    from m2ib.models.sources import load_adapter
    return load_adapter(EMBEDDED_MODEL_NAME, pretrained="embedded", device=device)
