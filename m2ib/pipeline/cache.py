"""A per-sample on-disk cache of attributions, keyed by everything that determines them.

Folder key = hash of (model identity, method name, the method's resolved hyperparameters, run seed,
the code that computes maps, torch/open_clip versions). Each sample is its own file, named by a
sanitised id plus a hash of the exact id (so ids that sanitise alike never share a file), holding a
fingerprint of the sample's caption and pixels: a row whose sample changed (another data subset,
other preprocessing of the same id) counts as missing and is recomputed, never returned.
Rows are numpy `.npz` files read with allow_pickle=False (no pickle anywhere, so a cache folder
cannot run code). Files are written atomically (temporary file + rename) as soon as their batch
finishes, so an interrupted run loses at most the batch in flight and a re-run computes only what is
missing; a change of metric never recomputes maps. A damaged row (truncated, empty, not an npz, wrong
keys, dtypes or shapes) is reported once with a warning naming the file, deleted and so recomputed;
temporary files left by a killed writer are removed when the cache is opened.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import zipfile
from functools import lru_cache
from importlib import metadata as _md
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from m2ib.core.records import Attribution, Sample

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TMP = re.compile(r"\.tmp\d+$")
#: A temporary file older than this is a leftover of a killed writer (a live one renames its file
#: within a second). Age, not "is its pid alive", because a cache folder may be shared by processes
#: on several hosts (pids mean nothing across hosts); the margin is wide so a slow writer is never hit.
_STALE_TMP_SECONDS = 3600
#: Row keys -> (dtype, ndim); "U" is any unicode width. image and text may be absent.
_ROW = {"fingerprint": ("U", 0), "image": (np.float32, 2), "text": (np.float32, 1),
        "token_mask": (np.bool_, 1), "tokens": ("U", 1), "seconds": (np.float64, 0)}
#: Appended to every stored token: numpy unicode arrays drop trailing NUL characters.
_END = "|"
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)
_ROOT = Path(__file__).resolve().parents[2]
#: Code whose change changes maps (metrics, tables and figures are deliberately not in it).
_MAP_CODE = ("m2ib/core/*.py", "m2ib/models/*.py", "m2ib/method/*.py", "baselines/*.py")
_NOT_MAP_CODE = ("figures.py", "metric.py", "paths.py", "progress.py")


def config_key(payload: dict) -> str:
    """Stable short hash of a JSON-serialisable description."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sources_hash(patterns, skip=()) -> "hashlib._Hash":
    """sha256 over the paths and bytes of the checkout's files matching `patterns` (names in `skip` left out)."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(_ROOT.glob(pattern)):
            if path.name not in skip:
                h.update(str(path.relative_to(_ROOT)).encode() + path.read_bytes())
    return h


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the source files that compute maps, plus torch and open_clip versions."""
    h = sources_hash(_MAP_CODE, _NOT_MAP_CODE)
    for pkg in ("torch", "open_clip_torch"):
        try:
            h.update(_md.version(pkg).encode())
        except _md.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def fingerprint(sample: Sample) -> str:
    """What the map of a sample depends on besides the method: its caption and its pixels."""
    image = sample.image.convert("RGB")
    h = hashlib.sha1(sample.caption.encode())
    h.update(repr(image.size).encode())
    h.update(image.tobytes())
    return h.hexdigest()


def write_npz(target: Path, arrays: dict) -> None:
    """Write arrays to `target` atomically (temporary file + rename), so a reader never sees half a file."""
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:                   # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    os.replace(tmp, target)


class AttributionCache:
    """Folder `<root>/<method>-<key>/` with one file per sample and a `key.json` saying what the key covers."""

    def __init__(self, root, method: str, identity: dict):
        self.identity = {"method": method, "code": code_version(), **identity}
        self.key = f"{method}-{config_key(self.identity)}"
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            key_file.write_text(json.dumps(self.identity, sort_keys=True, indent=1, default=str))
        for tmp in self.dir.glob("*.tmp*"):
            try:
                if _TMP.search(tmp.name) and time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()
            except FileNotFoundError:                    # renamed or removed by another process meanwhile
                pass

    def path(self, sample_id: str) -> Path:
        digest = hashlib.sha1(sample_id.encode()).hexdigest()[:10]
        return self.dir / f"{_SAFE.sub('_', sample_id)[:80]}-{digest}.npz"

    @staticmethod
    def _read(path: Path) -> dict:
        """The arrays of a row file; raises one of _UNREADABLE if the file is not a well-formed row."""
        # Our own file object: np.load leaks the one it opens when the zip is unreadable.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # a plain .npy: TypeError here
            row = {k: z[k] for k in _ROW if k in z.files}
        for key, (dtype, ndim) in _ROW.items():
            value = row.get(key)
            if value is None and key in ("image", "text"):
                continue
            kind_ok = value is not None and (value.dtype.kind == "U" if dtype == "U" else value.dtype == dtype)
            if not kind_ok or value.ndim != ndim:
                raise ValueError(f"bad or missing {key!r}")
        tokens = row["tokens"].tolist()
        if "text" in row and row["text"].shape != row["token_mask"].shape:
            raise ValueError("text and token_mask differ in length")
        if not all(t.endswith(_END) for t in tokens):
            raise ValueError("bad 'tokens'")
        row.update(fingerprint=str(row["fingerprint"]), seconds=float(row["seconds"]),
                   tokens=[t[:-len(_END)] for t in tokens])
        return row

    def _load(self, sample: Sample):
        path = self.path(sample.id)
        if not path.exists():
            return None
        try:
            row = self._read(path)
        except _UNREADABLE as e:
            log.warning("damaged cache row %s (%s: %s); deleting it, it will be recomputed", path, type(e).__name__, e)
            path.unlink(missing_ok=True)                 # now simply missing: reported once, rewritten by put
            return None
        return row if row["fingerprint"] == fingerprint(sample) else None

    def missing(self, samples: Sequence[Sample]) -> list[Sample]:
        """Samples with no cached row, or whose cached row was computed for other pixels or caption."""
        return [s for s in samples if self._load(s) is None]

    def put(self, samples: Sequence[Sample], attribution: Attribution) -> None:
        """Store each row of a batch's Attribution under its sample."""
        def array(t, dtype):
            return t.detach().to("cpu", dtype).numpy()

        for i, sample in enumerate(samples):
            row = {"fingerprint": np.array(fingerprint(sample)),
                   "token_mask": array(attribution.token_mask[i], torch.bool),
                   "tokens": np.array([t + _END for t in attribution.tokens[i]], dtype=str),
                   "seconds": np.array(attribution.seconds / len(samples), dtype=np.float64)}
            if attribution.image is not None:
                row["image"] = array(attribution.image[i], torch.float32)
            if attribution.text is not None:
                row["text"] = array(attribution.text[i], torch.float32)
            write_npz(self.path(sample.id), row)

    def get(self, samples: Sequence[Sample]) -> Attribution:
        """The cached rows of samples, in order, as one Attribution (meta['cache_key'] names the folder)."""
        rows = [self._load(s) for s in samples]
        stale = [s.id for s, r in zip(samples, rows) if r is None]
        if stale:
            raise RuntimeError(f"{self.dir}: no valid cached rows for samples {stale[:5]}")
        width = max(r["token_mask"].shape[0] for r in rows)

        def pad(a):
            return torch.nn.functional.pad(torch.from_numpy(a), (0, width - a.shape[0]))

        image = None if "image" not in rows[0] else torch.stack([torch.from_numpy(r["image"]) for r in rows])
        text = None if "text" not in rows[0] else torch.stack([pad(r["text"]) for r in rows])
        return Attribution(self.identity["method"], image, text,
                           [r["tokens"] + [""] * (width - len(r["tokens"])) for r in rows],
                           torch.stack([pad(r["token_mask"]) for r in rows]),
                           seconds=sum(r["seconds"] for r in rows),
                           meta={"seconds_per_pair": [r["seconds"] for r in rows], "cache_key": self.key})
