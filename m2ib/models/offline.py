"""Offline behaviour of model loading in one place: is the Hub reachable, Hub offline mode, and the
messages that say what to download, the command, where to put it and which config key points to it.

When HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set or huggingface.co cannot be reached in a few seconds,
the Hub is used in offline mode (cache only), so a missing file fails at once with a
ModelUnavailableError instead of hanging on retries.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Optional

HUB_HOST = "huggingface.co"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


# ---- network / cache helpers ------------------------------------------------------------------------
def env_offline() -> bool:
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


def looks_like_path(value: str) -> bool:
    return ("/" in value or os.sep in value or value.startswith(("~", "."))
            or value.lower().endswith(CHECKPOINT_SUFFIXES) or Path(value).exists())


# ---- messages ---------------------------------------------------------------------------------------------
def tag_message(name: str, tag: str, cfg: dict, cache_dir: Optional[str], reason: str,
                tokenizer_repo: Optional[str] = None) -> str:
    """tokenizer_repo: the Hub repo of the model's tokenizer where it is one (SigLIP), fetched too."""
    repo = os.path.split(cfg.get("hf_hub", ""))[0]    # 'org/repo/' or 'org/repo/file.bin' (open_clip's form)
    where = f"the Hugging Face cache {_hub_cache_dir(cache_dir)} (models--{repo.replace('/', '--')})" if repo \
        else f"~/.cache/clip/{os.path.basename(cfg.get('url', ''))}"
    what = 'Hub repo ' + repo if repo else cfg.get('url', 'the checkpoint')
    fetch_tokenizer = f"; open_clip.get_tokenizer('{name}')" if tokenizer_repo else ""
    return (
        f"open_clip weights {name!r} / pretrained={tag!r} are not available here ({reason}).\n"
        f"What: {what}{' and the tokenizer of Hub repo ' + tokenizer_repo if tokenizer_repo else ''}.\n"
        f"Download on a connected machine:\n"
        f"    python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}'){fetch_tokenizer}\"\n"
        f"Put it: copy that machine's Hugging Face cache folder to {where} here (or point HF_HOME at "
        f"a copy), or save the checkpoint file anywhere and set model.pretrained=/path/to/file.\n"
        f"Config keys: model.name={name} and model.pretrained={tag}.")


def hub_message(name: str, cache_dir: Optional[str], reason: str, extra_repos=()) -> str:
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


def tower_message(name: str, repos, reason: str) -> str:
    return (
        f"model {name!r} builds its text tower from Hugging Face Hub repo(s) {', '.join(repos)} "
        f"(config + tokenizer), which are not available here ({reason}).\n"
        f"Download on a connected machine:\n"
        f"    python -c \"import open_clip; open_clip.create_model('{name}', pretrained_text=False); "
        f"open_clip.get_tokenizer('{name}')\"\n"
        f"Put it: copy that machine's Hugging Face cache (~/.cache/huggingface/hub) to the same place here, "
        f"or set HF_HOME to a folder holding it.\n"
        f"Config key: model.name={name}.")


def tokenizer_message(name: str, repo: str, cache_dir: Optional[str], reason: str) -> str:
    return (f"model {name!r} needs the tokenizer of Hugging Face Hub repo {repo}, which is not cached here "
            f"({reason}): on a connected machine run "
            f"`python -c \"import open_clip; open_clip.get_tokenizer('{name}')\"` "
            f"and copy its Hugging Face cache (~/.cache/huggingface/hub) to {_hub_cache_dir(cache_dir)} here "
            f"(or set HF_HOME to a folder holding it); config key model.name={name}.")


def missing_file_message(name: str, path: str) -> str:
    return (f"checkpoint file {path} for model {name!r} does not exist.\n"
            f"Put the checkpoint file at {path} (e.g. copy it from the machine it was trained or downloaded "
            f"on), or change the config key model.pretrained to the file's real path; use "
            f"model.pretrained=null for random weights.")


def hf_transformers_message(name: str, target: str, what: str, local: bool, cache_dir: Optional[str],
                            reason: str) -> str:
    """A transformers model ('hf:<hub id or folder>') missing a file: what to download or save, and where."""
    if local:
        return (f"model {name!r}: {what} missing in folder {target} ({reason}).\n"
                f"Write the folder with `CLIPModel.save_pretrained(folder)` and `CLIPProcessor.save_pretrained(folder)` "
                f"(config.json, model.safetensors, tokenizer.json or vocab.json + merges.txt, preprocessor_config.json), "
                f"or `hf download ORG/REPO --local-dir {target}` on a connected machine.\n"
                f"Config key: model.name=hf:/path/to/folder.")
    return (f"model {name!r}: {what} of Hugging Face Hub repo {target} not available here ({reason}).\n"
            f"Download on a connected machine: `hf download {target}` (older huggingface_hub: "
            f"`huggingface-cli download {target}`).\n"
            f"Put it: copy that machine's Hugging Face cache (~/.cache/huggingface/hub/models--{target.replace('/', '--')}) "
            f"to {_hub_cache_dir(cache_dir)} here, or set HF_HOME to a folder holding it; or save it as a folder and "
            f"set model.name=hf:/path/to/folder.\n"
            f"Config key: model.name=hf:{target}.")
