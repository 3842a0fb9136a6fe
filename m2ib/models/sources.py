"""Model loading in two steps: resolve(name, pretrained) -> ModelSource, then build(source) -> adapter.

name (config key `model.name`):
  - an open_clip config name: built-in ('ViT-B-32', 'ViT-B-16', 'ViT-L-14', 'RN50', ...) or one of this
    project's configs in m2ib/model_configs/ (registered here);
  - a path to an open_clip model config JSON ('/path/my-clip.json': embed_dim, vision_cfg, text_cfg), e.g.
    a CLIP trained in-house; it is registered under its file name (which must not shadow another config);
  - 'hf-hub:org/repo' (config + weights from the Hugging Face Hub, e.g. BiomedCLIP);
  - 'local-dir:/path' (a folder with open_clip_config.json and a weights file);
  - 'hf:org/repo' or 'hf:/path' (a Hugging Face transformers CLIPModel from the Hub cache or a
    `save_pretrained` folder; models/hf_clip.py).
pretrained (config key `model.pretrained`):
  - None: random weights drawn from `seed` (tests, sanity baselines); with an 'hf-hub:', 'local-dir:' or
    'hf:' name, that model's own weights;
  - 'embedded': the committed embedded-benchmark checkpoint (sha256 checked; models/embedded.py);
  - an open_clip tag such as 'openai' (weights from the HF Hub cache);
  - a path to a local checkpoint file (e.g. a CLIP fine-tuned on chest X-rays); with an 'hf-hub:',
    'local-dir:' or 'hf:' name the file replaces that model's weights.

Each kind of source is one entry of MODEL_SOURCES (a matcher and a resolver); resolving checks
everything that can be checked without building (names, tags, files, hashes) and carries the model's
description: its identity (what names it; the attribution cache adds the digest of the loaded weights) and its
M2IB defaults (M2IB_SETTINGS), which
explain() and Hydra runs both use. The adapter family is picked from the BUILT model, not the name.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from m2ib.core.errors import InputError, ModelUnavailableError, UnsupportedError
from m2ib.core.registry import Registry
from m2ib.models import embedded, offline

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False

#: Published M2IB settings per model (Wang et al. 2023): ViT-B/32 on Conceptual Captions layers 9/9,
#: beta 0.1/0.1; the MS-CXR model (BiomedCLIP) 9/7, beta 1/1. Others follow the rule in
#: ModelAdapter.default_m2ib_settings.
M2IB_SETTINGS = {
    "ViT-B-32": {"image_layer": 9, "text_layer": 9, "image_beta": 0.1, "text_beta": 0.1},
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224":
        {"image_layer": 9, "text_layer": 7, "image_beta": 1.0, "text_beta": 1.0},
    embedded.EMBEDDED_MODEL_NAME: embedded.M2IB_SETTINGS,
}
M2IB_SETTINGS["hf:openai/clip-vit-base-patch32"] = M2IB_SETTINGS["ViT-B-32"]   # the same model, loaded by transformers


@dataclass(frozen=True)
class ModelSource:
    """Everything needed to build a model, resolved and checked before any weights are read."""

    kind: str                           # the MODEL_SOURCES entry that resolved it
    name: str
    pretrained: Optional[str]
    checkpoint: Optional[str] = None    # a local weights file to load
    tag_cfg: Optional[dict] = None      # open_clip's description of a pretrained tag
    model_cfg: Optional[dict] = None
    needs_hub: bool = False
    create_kwargs: dict = field(default_factory=dict)
    m2ib_defaults: dict = field(default_factory=dict)
    config_name: Optional[str] = None   # the open_clip config to build when it differs from `name` (a JSON path)
    config_sha256: Optional[str] = None  # a JSON config's content (the path alone may be edited in place)

    def identity(self) -> dict:
        """What names the model (the attribution cache adds the loaded weights: ModelAdapter.weights_digest)."""
        extra = {"config_sha256": self.config_sha256} if self.config_sha256 else {}
        return {"name": self.name, "pretrained": self.pretrained, **extra}


@dataclass(frozen=True)
class SourceKind:
    matches: Callable[[str, Optional[str]], bool]
    resolve: Callable[[str, Optional[str]], ModelSource]
    priority: int                       # lower is tried first


MODEL_SOURCES: Registry[SourceKind] = Registry("model source")


def register_source(kind: str, matches, priority: int):
    def wrap(fn):
        MODEL_SOURCES.register(kind, SourceKind(matches, fn, priority))
        return fn
    return wrap


def register_project_configs() -> None:
    """Make the project's small open_clip configs (m2ib/model_configs/*.json) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


# ---- resolution ------------------------------------------------------------------------------------------
def resolve(name: str, pretrained: Optional[str] = None) -> ModelSource:
    """The source of (name, pretrained): checked, with the model's description attached."""
    register_project_configs()
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"model.name must be a non-empty string, got {name!r}")
    if pretrained is not None and (not isinstance(pretrained, str) or not pretrained.strip()):
        raise InputError(f"model.pretrained must be null, an open_clip tag or a file path, got {pretrained!r}")
    kinds = sorted(((k, MODEL_SOURCES.get(k)) for k in MODEL_SOURCES.names()), key=lambda kv: kv[1].priority)
    kind, entry = next((k, e) for k, e in kinds if e.matches(name, pretrained))
    source = entry.resolve(name, pretrained)
    return replace(source, kind=kind, m2ib_defaults=dict(M2IB_SETTINGS.get(name, {})))


def _checkpoint(name: str, pretrained: Optional[str]) -> Optional[str]:
    if not pretrained:
        return None
    path = os.path.expanduser(pretrained)
    if not Path(path).is_file():
        raise ModelUnavailableError(offline.missing_file_message(name, path))
    return path


def _hub_text_repos(model_cfg: dict, tower_only: bool = False) -> list[str]:
    """Hub repos an HF text tower (and, unless tower_only, the tokenizer) reads at build time (not local folders)."""
    text = (model_cfg or {}).get("text_cfg", {})
    names = {text.get("hf_model_name")} if tower_only else {text.get("hf_model_name"), text.get("hf_tokenizer_name")}
    return [r for r in names if r and not Path(r).exists()]


def _hub_tokenizer_repo(model_cfg: dict) -> Optional[str]:
    """The Hub repo an open_clip text tower's tokenizer comes from (e.g. SigLIP's), if not a local folder."""
    repo = (model_cfg or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    return repo if repo and not Path(repo).exists() else None


def _read_config(name: str) -> Optional[dict]:
    import open_clip
    try:
        return open_clip.get_model_config(name)
    except Exception:   # hub/local-dir configs that are not reachable yet: handled by the builder
        return None


@register_source("embedded", lambda name, pretrained: pretrained == "embedded", priority=0)
def _resolve_embedded(name: str, pretrained: Optional[str]) -> ModelSource:
    if name != embedded.EMBEDDED_MODEL_NAME:
        raise InputError(f"model.pretrained=embedded is the committed checkpoint of {embedded.EMBEDDED_MODEL_NAME!r}, "
                         f"not of {name!r}")
    embedded.verify_checkpoint()        # the committed file, checked against its recorded sha256
    return ModelSource("embedded", name, pretrained, checkpoint=str(embedded.CHECKPOINT),
                       model_cfg=_read_config(name),
                       create_kwargs={"pretrained_text": False, "pretrained_image": False})


@register_source("hf-hub", lambda name, pretrained: name.startswith("hf-hub:"), priority=1)
def _resolve_hub(name: str, pretrained: Optional[str]) -> ModelSource:
    ckpt = _checkpoint(name, pretrained)
    return ModelSource("hf-hub", name, pretrained, checkpoint=ckpt, needs_hub=True)


@register_source("local-dir", lambda name, pretrained: name.startswith("local-dir:"), priority=1)
def _resolve_local_dir(name: str, pretrained: Optional[str]) -> ModelSource:
    ckpt = _checkpoint(name, pretrained)
    folder = Path(name[len("local-dir:"):]).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise ModelUnavailableError(
            f"model.name={name!r}: {folder}/open_clip_config.json does not exist. Put the model folder "
            f"(open_clip_config.json + open_clip_model.safetensors, and the tokenizer files for an HF text "
            f"tower) at {folder}, e.g. `huggingface-cli download ORG/REPO --local-dir {folder}` on a "
            f"connected machine, or change model.name")
    model_cfg = _read_config(name)
    return ModelSource("local-dir", name, pretrained, checkpoint=ckpt, model_cfg=model_cfg,
                       needs_hub=bool(_hub_text_repos(model_cfg)))


@register_source("hf-transformers", lambda name, pretrained: name.startswith("hf:"), priority=1)
def _resolve_hf_transformers(name: str, pretrained: Optional[str]) -> ModelSource:
    from m2ib.models import hf_clip
    target = hf_clip.target_of(name)
    if not target:
        raise InputError(f"model.name={name!r} names no model: use hf:ORG/REPO (Hub) or hf:/path/to/folder")
    if pretrained and not Path(pretrained).expanduser().is_file():
        raise ModelUnavailableError(
            f"model.pretrained={pretrained!r} for model {name!r} is not a checkpoint file: it must be a state dict "
            f"(.safetensors/.bin/.pt) of this CLIPModel; use model.pretrained=null for the weights of {target}, and "
            f"model.name=hf:/path/to/folder for a save_pretrained folder")
    ckpt = _checkpoint(name, pretrained)
    local = hf_clip.is_local(target)
    folder = Path(target).expanduser()
    if local and not (folder / "config.json").is_file():
        raise ModelUnavailableError(offline.hf_transformers_message(name, str(folder), "config.json", True, None,
                                                                    "not found"))
    return ModelSource("hf-transformers", name, pretrained, checkpoint=ckpt, needs_hub=not local)


@register_source("json-config", lambda name, pretrained: name.lower().endswith(".json"), priority=1)
def _resolve_json_config(name: str, pretrained: Optional[str]) -> ModelSource:
    """An open_clip model config JSON given by path: registered with open_clip under its file name,
    then resolved like a built-in config (pretrained: null or a checkpoint file)."""
    import json

    import open_clip
    path = Path(name).expanduser()
    if not path.is_file():
        raise ModelUnavailableError(
            f"model.name={name!r} names an open_clip JSON config, but {path} does not exist. Put the config "
            f"(embed_dim, vision_cfg, text_cfg) there or change model.name")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"model.name={name!r}: cannot read the JSON config: {exc}") from exc
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InputError(
            f"model.name={name!r} is not an open_clip model config: it needs the keys embed_dim, vision_cfg and "
            f"text_cfg (like open_clip/model_configs/RN50.json); a folder with open_clip_config.json "
            f"(model_cfg + preprocess_cfg) is named 'local-dir:/path/to/folder' instead")
    config_name = path.stem
    known = _read_config(config_name) if config_name in open_clip.list_models() else None
    if known is not None and known != cfg:
        raise InputError(
            f"model.name={name!r}: its file name {config_name!r} is already a registered open_clip config with "
            f"different content; rename the JSON file (the name is how open_clip registers it)")
    if known is None:
        open_clip.add_model_config(path)
    source = _resolve_open_clip(config_name, pretrained)
    content = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    return replace(source, name=name, config_name=config_name, config_sha256=content)


@register_source("open_clip", lambda name, pretrained: True, priority=9)
def _resolve_open_clip(name: str, pretrained: Optional[str]) -> ModelSource:
    import open_clip
    ckpt = _checkpoint(name, pretrained) if pretrained and offline.looks_like_path(pretrained) else None
    if name not in open_clip.list_models():
        raise InputError(_unknown_name_message(name, open_clip.list_models()))
    model_cfg = _read_config(name)
    kwargs: dict = {}
    tag_cfg = None
    if pretrained and ckpt is None:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise InputError(f"model.pretrained={pretrained!r} is neither a known open_clip tag for {name} "
                             f"(known: {tags or 'none'}) nor an existing checkpoint file")
        # open_clip 3.x only warns on a QuickGELU mismatch (e.g. ViT-B-32 + 'openai'): silently
        # wrong embeddings. Use the activation the weights were trained with.
        if tag_cfg.get("quick_gelu", False) and not (model_cfg or {}).get("quick_gelu", False):
            kwargs["force_quick_gelu"] = True
    else:   # random weights, or a local file loaded by build: never fetch tower weights
        kwargs.update(pretrained_text=False, pretrained_image=False)
    return ModelSource("open_clip", name, pretrained, checkpoint=ckpt, tag_cfg=tag_cfg, model_cfg=model_cfg,
                       needs_hub=tag_cfg is not None or bool(_hub_text_repos(model_cfg)), create_kwargs=kwargs)


def _unknown_name_message(name: str, known: list[str]) -> str:
    import difflib
    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    return (f"unknown model.name {name!r}{f' (did you mean {close}?)' if close else ''}: available are this "
            f"project's configs {ours} and {len(known)} open_clip configs (list them with python -c \"import "
            f"open_clip; print(open_clip.list_models())\"); hub models are named 'hf-hub:org/repo', a folder "
            f"with open_clip_config.json 'local-dir:/path'; for your own architecture set model.name to the "
            f"path of its open_clip JSON config (/path/my-clip.json) and model.pretrained to its checkpoint")


_TIMM_CONVNET_MESSAGE = (
    "{name}: the image tower is a timm convolutional network ({tower}), not a ViT. The adapters here need "
    "patch tokens and transformer blocks (timm ViT), or open_clip's own ModifiedResNet (RN50, RN101, ...). "
    "Use a ViT model (e.g. ViT-B-32) or an open_clip RN* model.")


def pick_adapter_class(model, name: str):
    """The adapter family for a built open_clip model (the registered family whose `serves` says yes),
    or UnsupportedError naming what is missing."""
    from m2ib.models.base import ADAPTER_FAMILIES
    from m2ib.models.open_clip_hf import is_timm_vit
    serving = [ADAPTER_FAMILIES.get(f) for f in ADAPTER_FAMILIES.names() if ADAPTER_FAMILIES.get(f).serves(model)]
    if len(serving) > 1:
        raise RuntimeError(f"{name}: adapter families {[c.family for c in serving]} all claim this model")
    if serving:
        return serving[0]
    visual = getattr(model, "visual", None)
    vision_kind = type(visual).__name__
    text = getattr(model, "text", None)
    text_kind = "TextTransformer" if text is None and hasattr(model, "transformer") else type(text).__name__
    if vision_kind == "TimmModel" and not is_timm_vit(visual):
        trunk = type(getattr(visual, "trunk", visual)).__name__
        raise UnsupportedError(_TIMM_CONVNET_MESSAGE.format(name=name, tower=trunk))
    raise UnsupportedError(
        f"{name}: no adapter for image tower {vision_kind} + text tower {text_kind}. Supported: open_clip "
        f"VisionTransformer + open_clip TextTransformer (OpenClipViTAdapter), open_clip ModifiedResNet + open_clip "
        f"TextTransformer (OpenClipResNetAdapter), timm ViT/EVA (TimmModel) + HF BERT (HFTextEncoder) "
        f"(OpenClipHFAdapter), timm ViT/EVA + open_clip TextTransformer (OpenClipTimmAdapter); use a model of "
        f"one of those shapes.")


# ---- building ----------------------------------------------------------------------------------------------
class _DropRandomInitNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(enabled: bool):
    """open_clip warns on the root logger that weights are random; with pretrained=None that is the request."""
    note = _DropRandomInitNote()
    if enabled:
        logging.getLogger().addFilter(note)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(note)


def build(source: ModelSource, device: str = "cpu", seed: int = 0, cache_dir: Optional[str] = None):
    """The adapter of a resolved source. Random initialisation draws from `seed` without touching the
    caller's global RNG state. cache_dir: Hugging Face cache (default: HF_HOME)."""
    import open_clip

    if source.kind == "hf-transformers":      # a transformers CLIPModel has its own loader
        from m2ib.models.hf_clip import build_hf_clip
        return _describe(build_hf_clip(source, device=device, cache_dir=cache_dir), source)
    name, hub_schema = source.name, source.kind in ("hf-hub", "local-dir")
    model_cfg = source.model_cfg
    is_offline = source.needs_hub and (offline.env_offline() or not offline.hub_reachable())
    reason = "offline: HF_HUB_OFFLINE is set" if offline.env_offline() else "offline: huggingface.co is unreachable"
    kwargs = dict(source.create_kwargs)
    try:
        with offline.hub_offline_mode(is_offline), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if hub_schema and model_cfg is None:
                try:   # reads open_clip_config.json (cache only when offline)
                    model_cfg = _read_config(name) if source.kind == "local-dir" else \
                        open_clip.factory._get_hf_config(name[len("hf-hub:"):], cache_dir=cache_dir).get("model_cfg")
                except Exception as exc:
                    raise ModelUnavailableError(offline.hub_message(name, cache_dir, reason if is_offline else str(exc))) from exc
            config_name = source.config_name or name
            offline_reason = reason if is_offline else None
            tokenizer = None
            if _hub_tokenizer_repo(model_cfg) and not _hub_text_repos(model_cfg, tower_only=True) \
                    and source.tag_cfg is None and not hub_schema:
                # a Hub tokenizer next to random or local weights and an open_clip text tower (SigLIP): fail
                # before the slow model build (a Hub text tower's own message names its config too)
                tokenizer = _tokenizer(config_name, model_cfg, cache_dir, offline_reason)
            if hub_schema:
                if source.checkpoint is not None:
                    kwargs.update(load_weights=False, pretrained_text=False, pretrained_image=False)
                else:   # open_clip would otherwise fall back to RANDOM weights with only a log line
                    kwargs["require_pretrained"] = True
            # a local checkpoint is loaded below (one-line report of keys that do not fit)
            pretrained_arg = None if hub_schema or source.checkpoint else source.pretrained
            with _quiet_random_init(pretrained_arg is None and not hub_schema):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    config_name, pretrained=pretrained_arg, device="cpu", cache_dir=cache_dir, **kwargs)
            if source.checkpoint is not None:
                _load_checkpoint(model, name, source.checkpoint)
            if tokenizer is None:
                tokenizer = _tokenizer(config_name, model_cfg, cache_dir, offline_reason)
    except (ModelUnavailableError, UnsupportedError, InputError):
        raise
    except Exception as exc:   # download/cache/checkpoint failures of open_clip, huggingface_hub, transformers
        why = reason if is_offline else f"{type(exc).__name__}: {exc}"
        if source.checkpoint is not None and not is_offline:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InputError(      # the file exists (a missing one is ModelUnavailableError above) but is not usable
                f"could not load checkpoint file {source.checkpoint} into model {name!r} ({type(exc).__name__}: "
                f"{first}); check that model.pretrained points at weights for this architecture (model.name)") from exc
        if source.tag_cfg is not None:
            raise ModelUnavailableError(offline.tag_message(name, source.pretrained, source.tag_cfg, cache_dir, why,
                                                            _hub_tokenizer_repo(model_cfg))) from exc
        if source.kind == "hf-hub":
            raise ModelUnavailableError(offline.hub_message(name, cache_dir, why, _hub_text_repos(model_cfg))) from exc
        if source.needs_hub:
            raise ModelUnavailableError(offline.tower_message(name, _hub_text_repos(model_cfg), why)) from exc
        raise ModelUnavailableError(f"could not build model.name={name!r}: {type(exc).__name__}: {exc}") from exc
    return _describe(pick_adapter_class(model, name)(model, preprocess, tokenizer, name=name, device=device), source)


def _describe(adapter, source: ModelSource):
    """The adapter with its source and the source's M2IB defaults attached."""
    adapter.m2ib_defaults = dict(source.m2ib_defaults)
    adapter.source = source
    return adapter


def _tokenizer(name: str, model_cfg: Optional[dict], cache_dir: Optional[str], offline_reason: Optional[str]):
    """open_clip's tokenizer for `name`; a Hub tokenizer that cannot be had says what to download."""
    import open_clip
    try:
        return open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except Exception as exc:
        repo = _hub_tokenizer_repo(model_cfg)
        if repo is None:
            raise
        why = offline_reason or f"{type(exc).__name__}: {exc}"
        raise ModelUnavailableError(offline.tokenizer_message(name, repo, cache_dir, why)) from exc


def _load_checkpoint(model, name: str, path: str) -> None:
    """Load a local weights file into `model` (open_clip's conversions included), or fail with ONE line
    naming the first missing, unexpected and mis-shaped keys and the fix."""
    import open_clip
    try:
        open_clip.load_checkpoint(model, path, strict=True)
    except RuntimeError as exc:
        mismatch = _key_mismatch(str(exc))
        if mismatch is None:
            raise
        raise InputError(     # the file is there but does not fit (as for HF folders, hf_clip.py): a setting to fix
            f"checkpoint file {path} does not fit model {name!r}: {mismatch}. Fix: set model.name to the "
            f"architecture the checkpoint was trained with (an open_clip config name or the path of its JSON "
            f"config), or model.pretrained to weights of {name!r}") from exc


def _key_mismatch(report: str) -> Optional[str]:
    """'N missing keys (first: ...); ...' from torch's strict load_state_dict error, None if it is another error."""
    import re

    def quoted(label):
        found = re.search(re.escape(label) + r' ((?:"[^"]*"(?:, )?)+)', report)
        return re.findall(r'"([^"]*)"', found.group(1)) if found else []
    groups = (("missing keys", quoted("Missing key(s) in state_dict:")),
              ("unexpected keys", quoted("Unexpected key(s) in state_dict:")),
              ("keys of another shape", re.findall(r"size mismatch for ([^:\s]+):", report)))
    parts = [f"{len(keys)} {what} (first: {', '.join(keys[:3])})" for what, keys in groups if keys]
    return "; ".join(parts) or None


def load_adapter(name: str = "m2ib-tiny-vit", pretrained: Optional[str] = None, device: str = "cpu",
                 seed: int = 0, cache_dir: Optional[str] = None):
    """build(resolve(name, pretrained)): an adapter for `name` with weights from `pretrained`."""
    return build(resolve(name, pretrained), device=device, seed=seed, cache_dir=cache_dir)
