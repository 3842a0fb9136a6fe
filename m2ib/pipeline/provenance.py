"""What produced a table, and the rules that keep published tables honest.

- result_identity(cfg): the short hash of everything that determines a table's numbers (methods,
  metrics and their hyperparameters, model, data selection, seed); it is part of every table's name,
  so two configurations never share a file and multirun jobs never overwrite each other.
- run_metadata(): the sidecar: git commit and whether the tree was clean, the hash of the code that
  computes maps, a fingerprint of exactly the evaluated samples (captions + decoded pixels), the data
  location, device, threads, package versions, the resolved config and timings.
- check_publishable(): publishing (make reproduce-*) is refused from a tree with uncommitted changes
  outside results/, unless allow_dirty=true, which the sidecar then records, and from an installed copy
  (no checkout: the table could not pin its commit); ad hoc runs of an installed copy record no commit.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import subprocess
from importlib import metadata as _md
from pathlib import Path
from typing import Optional, Sequence

from m2ib.core.errors import InputError
from m2ib.core.paths import PACKAGE_DIR, source_checkout
from m2ib.core.records import Sample
from m2ib.pipeline.cache import code_version, config_key, fingerprint

#: Config keys that do not change a table's numbers (where and how fast it is computed, what is drawn,
#: the regression check's tolerances).
NOT_IDENTITY = ("device", "threads", "batch_size", "progress", "cache_dir", "results_dir", "published_dir",
                "publish", "allow_dirty", "write_results", "figures", "report", "hydra", "regression")
#: Data keys that select a shard of the same table (merge_shards.py joins them).
SHARD_KEYS = ("shard", "num_shards")


def result_identity(cfg: dict) -> str:
    """Short hash of the resolved configuration that determines a table's numbers."""
    payload = {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}
    payload["data"] = {k: v for k, v in (cfg.get("data") or {}).items() if k not in SHARD_KEYS}
    return config_key(payload)[:10]


def package_versions(names=("torch", "torchvision", "open_clip_torch", "numpy", "pandas", "scikit-image",
                            "captum", "grad-cam", "hydra-core", "timm", "transformers")) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = _md.version(n)
        except _md.PackageNotFoundError:
            out[n] = None
    return out


def git_state(cwd: Optional[Path] = None) -> dict:
    """{'commit': HEAD or None, 'dirty_files': tracked files changed outside results/ (the tables being
    written are not the code that writes them)} of `cwd`, by default the source checkout the code runs
    from; an installed copy is not one (even inside someone else's git repository): no commit."""
    cwd = cwd or source_checkout()
    if cwd is None:
        return {"commit": None, "dirty_files": []}

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty_files": []}
    return {"commit": commit, "dirty_files": [line[3:] for line in status.splitlines() if line.strip()]}


def check_publishable(cfg: dict, state: dict) -> None:
    """Refuse to publish tables that would not pin the code that produced them."""
    if not cfg.get("publish"):
        return
    if state["commit"] is None:
        where = "an installed copy" if source_checkout() is None else "not a git checkout"
        raise InputError(f"publish=true needs a git checkout of m2ib-bench (a published table records its commit); "
                         f"the code in {PACKAGE_DIR} is {where}: publish from a clone with `make reproduce-...`, "
                         f"or drop publish=true (ad hoc tables go to results_dir)")
    if state["dirty_files"] and not cfg.get("allow_dirty"):
        files = ", ".join(state["dirty_files"][:5]) + (" ..." if len(state["dirty_files"]) > 5 else "")
        raise InputError(f"refusing to publish from a tree with uncommitted changes ({files}): commit them first, "
                         f"or pass allow_dirty=true (recorded in the table's sidecar)")


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over the ids, captions and decoded pixels of exactly the evaluated samples, in order."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.id}\t{fingerprint(s)}\n".encode())
    return h.hexdigest()


def data_location(data: dict) -> dict:
    """Where the evaluated files were read from: the path keys of the data config, or the embedded
    split's generated folder (movable with $M2IB_EMBEDDED_CACHE)."""
    if data.get("kind") == "embedded":
        from m2ib.data.embedded import split_dir
        return {"folder": str(split_dir(data.get("split", "test")).resolve())}
    return {k: v for k, v in data.items() if isinstance(v, str) and k.endswith(("_path", "_root", "manifest"))}


def run_metadata(cfg: dict, samples: Sequence[Sample], device: str, seeds: dict, state: dict) -> dict:
    """The sidecar of a table: what produced it (see the module docstring)."""
    import torch
    data = cfg.get("data") or {}
    return {
        "result_identity": result_identity(cfg),
        "git_commit": state["commit"],
        "code_from": "git checkout" if state["commit"] else f"not a git checkout ({PACKAGE_DIR})",
        "git_clean": not state["dirty_files"],
        "git_dirty_files": state["dirty_files"],
        "dirty_allowed": bool(cfg.get("allow_dirty")) and bool(state["dirty_files"]),
        "code_version": code_version(),
        "data_fingerprint": data_fingerprint(samples),
        "data_location": data_location(data),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device if device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "n_samples": len(samples),
        "seeds": seeds,
    }


def check_overwrite(meta_path: Path, identity: str) -> None:
    """A table is only ever rewritten by the configuration that produced it."""
    if not meta_path.is_file():
        return
    try:
        old = json.loads(meta_path.read_text()).get("result_identity")
    except (OSError, ValueError):
        old = None
    if old != identity:
        raise InputError(f"{meta_path} was written by another configuration (identity {old}, this run {identity}); "
                         f"refusing to overwrite it: move it away or choose another results_dir")
