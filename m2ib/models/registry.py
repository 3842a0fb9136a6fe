"""Build a model adapter from a model name and a weights source, with clear offline errors.

name (config key `model.name`):
  - an open_clip config name: built-in ('ViT-B-32', 'ViT-B-16', 'ViT-L-14', ...) or one of this
    project's configs in m2ib/model_configs/ (registered here);
  - 'hf-hub:org/repo' (config + weights from the Hugging Face Hub, e.g. BiomedCLIP);
  - 'local-dir:/path' (a folder with open_clip_config.json and a weights file).
pretrained (config key `model.pretrained`):
  - None: random weights drawn from `seed` (tests, sanity baselines);
  - an open_clip tag such as 'openai' (weights from the HF Hub cache);
  - a path to a local checkpoint file (e.g. a CLIP fine-tuned on chest X-rays); with an 'hf-hub:'
    or 'local-dir:' name the file replaces that model's weights.

The adapter family is picked from the BUILT model, not the name: open_clip ViT + open_clip text
transformer -> OpenClipViTAdapter; timm ViT + HF BERT (CustomTextCLIP) -> OpenClipHFAdapter.

Offline: when HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set or huggingface.co cannot be reached in a
few seconds, the Hub is used in offline mode (cache only), so a missing file fails at once with a
ModelUnavailableError saying what to download, the command, where it goes and which config key
points to it, instead of hanging on retries.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Optional

import torch

from m2ib.errors import InputError, ModelUnavailableError, UnsupportedError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
HUB_HOST = "huggingface.co"
_registered = False


def register_project_configs() -> None:
    """Make the project's small open_clip configs (m2ib/model_configs/*.json) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


# ---- network / cache helpers ------------------------------------------------------------------------
def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens within `timeout` s (DNS included: run in a thread,
    since getaddrinfo ignores socket timeouts)."""
    host = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}").split("://")[-1].split("/")[0]
    result = []

    def probe():
        try:
            socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def hub_offline_mode(enabled: bool):
    """Within the block, huggingface_hub and transformers read only the local cache."""
    if not enabled:
        yield
        return
    import huggingface_hub.constants as hc
    saved_const, saved_env = hc.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hc.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = saved_const
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _hub_cache_dir(cache_dir: Optional[str]) -> str:
    if cache_dir:
        return str(cache_dir)
    import huggingface_hub.constants as hc
    return hc.HF_HUB_CACHE


def _looks_like_path(value: str) -> bool:
    return ("/" in value or os.sep in value or value.startswith(("~", "."))
            or value.lower().endswith(CHECKPOINT_SUFFIXES) or Path(value).exists())


# ---- messages ---------------------------------------------------------------------------------------------
def _tag_message(name: str, tag: str, cfg: dict, cache_dir: Optional[str], reason: str) -> str:
    repo = os.path.split(cfg.get("hf_hub", ""))[0]    # 'org/repo/' or 'org/repo/file.bin' (open_clip's form)
    where = f"the Hugging Face cache {_hub_cache_dir(cache_dir)} (models--{repo.replace('/', '--')})" if repo \
        else f"~/.cache/clip/{os.path.basename(cfg.get('url', ''))}"
    return (
        f"open_clip weights {name!r} / pretrained={tag!r} are not available here ({reason}).\n"
        f"What: {'Hub repo ' + repo if repo else cfg.get('url', 'the checkpoint')}.\n"
        f"Download on a connected machine:\n"
        f"    python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"\n"
        f"Put it: copy that machine's Hugging Face cache folder to {where} here (or point HF_HOME at "
        f"a copy), or save the checkpoint file anywhere and set model.pretrained=/path/to/file.\n"
        f"Config keys: model.name={name} and model.pretrained={tag}.")


def _hub_message(name: str, cache_dir: Optional[str], reason: str, extra_repos=()) -> str:
    repo = name[len("hf-hub:"):]
    repos = [repo, *[r for r in extra_repos if r and r != repo]]
    return (
        f"model {name!r} is not available here ({reason}).\n"
        f"What: Hugging Face Hub repo(s) {', '.join(repos)} (open_clip_config.json, the weights file "
        f"and, for an HF text tower, its config and tokenizer files).\n"
        f"Download on a connected machine:\n"
        f"    python -c \"import open_clip; open_clip.create_model_from_pretrained('{name}'); "
        f"open_clip.get_tokenizer('{name}')\"\n"
        f"Put it: copy that machine's Hugging Face cache (~/.cache/huggingface/hub) to "
        f"{_hub_cache_dir(cache_dir)} here, or set HF_HOME to a folder holding it.\n"
        f"Config key: model.name={name} (model.pretrained may name a fine-tuned checkpoint file for the "
        f"same architecture).")


def _tower_message(name: str, repos, reason: str) -> str:
    return (
        f"model {name!r} builds its text tower from Hugging Face Hub repo(s) {', '.join(repos)} "
        f"(config + tokenizer), which are not available here ({reason}).\n"
        f"Download on a connected machine:\n"
        f"    python -c \"import open_clip; open_clip.create_model('{name}', pretrained_text=False); "
        f"open_clip.get_tokenizer('{name}')\"\n"
        f"Put it: copy that machine's Hugging Face cache (~/.cache/huggingface/hub) to the same place here, "
        f"or set HF_HOME to a folder holding it.\n"
        f"Config key: model.name={name}.")


def _missing_file_message(name: str, path: str) -> str:
    return (f"checkpoint file {path} for model {name!r} does not exist.\n"
            f"Put the checkpoint file at {path} (e.g. copy it from the machine it was trained or downloaded "
            f"on), or change the config key model.pretrained to the file's real path; use "
            f"model.pretrained=null for random weights.")


# ---- resolution ------------------------------------------------------------------------------------------
def _hub_text_repos(model_cfg: dict) -> list[str]:
    """Hub repos an HF text tower reads at build time (not local folders)."""
    text = (model_cfg or {}).get("text_cfg", {})
    return [r for r in {text.get("hf_model_name"), text.get("hf_tokenizer_name")} if r and not Path(r).exists()]


def _read_config(name: str) -> Optional[dict]:
    import open_clip
    try:
        return open_clip.get_model_config(name)
    except Exception:   # hub/local-dir configs that are not reachable yet: handled by the loader
        return None


def _refuse_unsupported_config(name: str, model_cfg: Optional[dict]) -> None:
    """Refuse a ResNet image tower from its config alone, before any weights are downloaded."""
    vision = (model_cfg or {}).get("vision_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)) and not vision.get("timm_model_name"):
        raise UnsupportedError(_RESNET_MESSAGE.format(name=name, tower="ModifiedResNet"))


_RESNET_MESSAGE = (
    "{name}: the image tower is a convolutional network ({tower}), not a ViT. The adapters here need patch "
    "tokens and transformer blocks (prefix/suffix at block l, attention, token grid); an open_clip ResNet "
    "adapter (hidden state after a residual stage, its spatial grid, the attention pool as the last step) "
    "is not implemented yet. Use a ViT model (e.g. ViT-B-32, ViT-B-16).")


def pick_adapter_class(model, name: str):
    """The adapter family for a built open_clip model, or UnsupportedError naming what is missing."""
    from open_clip.transformer import VisionTransformer, TextTransformer
    from m2ib.models.open_clip_vit import OpenClipViTAdapter
    from m2ib.models.open_clip_hf import OpenClipHFAdapter
    visual = getattr(model, "visual", None)
    text = getattr(model, "text", None)
    vision_kind = type(visual).__name__
    if text is None and hasattr(model, "transformer"):
        text_kind = "TextTransformer"          # open_clip CLIP keeps its text modules inline
    else:
        text_kind = type(text).__name__
    if isinstance(visual, VisionTransformer) and (text_kind == "TextTransformer" or isinstance(text, TextTransformer)):
        return OpenClipViTAdapter
    is_timm_vit = vision_kind == "TimmModel" and hasattr(getattr(visual, "trunk", None), "patch_embed") \
        and hasattr(visual.trunk, "blocks")
    if is_timm_vit and text_kind == "HFTextEncoder":
        return OpenClipHFAdapter
    if vision_kind == "ModifiedResNet" or (vision_kind == "TimmModel" and not is_timm_vit):
        trunk = type(getattr(visual, "trunk", visual)).__name__
        raise UnsupportedError(_RESNET_MESSAGE.format(name=name, tower=trunk))
    raise UnsupportedError(
        f"{name}: no adapter for image tower {vision_kind} + text tower {text_kind}. Supported: open_clip "
        f"VisionTransformer + open_clip TextTransformer (OpenClipViTAdapter), and timm VisionTransformer "
        f"(TimmModel) + HF BERT (HFTextEncoder) (OpenClipHFAdapter).")


def load_adapter(name: str = "m2ib-tiny-vit", pretrained: Optional[str] = None, device: str = "cpu",
                 seed: int = 0, cache_dir: Optional[str] = None):
    """An adapter for `name` with weights from `pretrained`; see the module docstring.

    cache_dir: Hugging Face cache for the CLIP config/weights (default: the HF cache, HF_HOME).
    """
    import open_clip

    register_project_configs()
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"model.name must be a non-empty string, got {name!r}")
    if pretrained is not None and (not isinstance(pretrained, str) or not pretrained.strip()):
        raise InputError(f"model.pretrained must be null, an open_clip tag or a file path, got {pretrained!r}")
    schema = "hf-hub" if name.startswith("hf-hub:") else "local-dir" if name.startswith("local-dir:") else None
    create_kwargs: dict = {}
    checkpoint: Optional[str] = None
    tag_cfg: Optional[dict] = None
    needs_hub = False

    if pretrained and (_looks_like_path(pretrained) or schema):
        checkpoint = os.path.expanduser(pretrained)
        if not Path(checkpoint).is_file():
            raise ModelUnavailableError(_missing_file_message(name, checkpoint))

    if schema is None:
        if name not in open_clip.list_models():
            ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise InputError(
                f"unknown model.name {name!r}: not an open_clip config (see open_clip.list_models()), nor one of "
                f"this project's configs {ours}; hub models are named 'hf-hub:org/repo'")
        model_cfg = _read_config(name)
        _refuse_unsupported_config(name, model_cfg)
        if pretrained and checkpoint is None:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise InputError(
                    f"model.pretrained={pretrained!r} is neither a known open_clip tag for {name} "
                    f"(known: {tags or 'none'}) nor an existing checkpoint file")
            needs_hub = True
            # open_clip 3.x only warns on a QuickGELU mismatch (e.g. ViT-B-32 + 'openai'): silently
            # wrong embeddings. Use the activation the weights were trained with.
            if tag_cfg.get("quick_gelu", False) and not (model_cfg or {}).get("quick_gelu", False):
                create_kwargs["force_quick_gelu"] = True
        needs_hub = needs_hub or bool(_hub_text_repos(model_cfg))
    elif schema == "local-dir":
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelUnavailableError(
                f"model.name={name!r}: {folder}/open_clip_config.json does not exist. Put the model folder "
                f"(open_clip_config.json + open_clip_model.safetensors, and the tokenizer files for an HF text "
                f"tower) at {folder}, e.g. `huggingface-cli download ORG/REPO --local-dir {folder}` on a "
                f"connected machine, or change model.name")
        model_cfg = _read_config(name)
        needs_hub = bool(_hub_text_repos(model_cfg))
    else:
        model_cfg = None
        needs_hub = True

    offline = False
    if needs_hub:
        offline = _env_offline() or not hub_reachable()
    reason = "offline: HF_HUB_OFFLINE is set" if _env_offline() else "offline: huggingface.co is unreachable"

    try:
        # random initialisation from `seed`, without touching the caller's global RNG state
        with hub_offline_mode(offline), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if schema is not None and model_cfg is None:
                try:   # reads open_clip_config.json (cache only when offline)
                    model_cfg = _read_config(name) if schema == "local-dir" else \
                        open_clip.factory._get_hf_config(name[len("hf-hub:"):], cache_dir=cache_dir).get("model_cfg")
                except Exception as exc:
                    raise ModelUnavailableError(_hub_message(name, cache_dir, reason if offline else str(exc))) from exc
            _refuse_unsupported_config(name, model_cfg)
            if checkpoint is not None or (pretrained is None and schema is None):
                # Random weights, or a local file loaded below: never fetch tower weights.
                create_kwargs.update(pretrained_text=False, pretrained_image=False)
            if schema is not None:
                if checkpoint is not None:
                    create_kwargs["load_weights"] = False
                else:   # open_clip would otherwise fall back to RANDOM weights with only a log line
                    create_kwargs["require_pretrained"] = True
            pretrained_arg = (checkpoint or pretrained) if schema is None else None
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained_arg, device="cpu", cache_dir=cache_dir, **create_kwargs)
            if schema is not None and checkpoint is not None:
                open_clip.load_checkpoint(model, checkpoint)
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except (ModelUnavailableError, UnsupportedError, InputError):
        raise
    except Exception as exc:   # download/cache/ checkpoint failures of open_clip, huggingface_hub, transformers
        why = reason if offline else f"{type(exc).__name__}: {exc}"
        if checkpoint is not None and not (offline and needs_hub):
            raise ModelUnavailableError(
                f"could not load checkpoint file {checkpoint} into model {name!r}: {type(exc).__name__}: {exc}\n"
                f"Check that model.pretrained points at weights for this architecture (model.name).") from exc
        if tag_cfg is not None:
            raise ModelUnavailableError(_tag_message(name, pretrained, tag_cfg, cache_dir, why)) from exc
        if schema == "hf-hub":
            raise ModelUnavailableError(_hub_message(name, cache_dir, why, _hub_text_repos(model_cfg))) from exc
        if needs_hub:
            raise ModelUnavailableError(_tower_message(name, _hub_text_repos(model_cfg), why)) from exc
        raise ModelUnavailableError(f"could not build model.name={name!r}: {type(exc).__name__}: {exc}") from exc
    cls = pick_adapter_class(model, name)
    return cls(model, preprocess, tokenizer, name=name, device=device)
