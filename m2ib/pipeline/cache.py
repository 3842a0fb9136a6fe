"""A per-sample on-disk cache of attributions, keyed by everything that determines them.

Folder key = hash of (model identity, method name, the method's resolved hyperparameters, run seed,
the code that computes maps, torch/open_clip versions). Each sample is its own file, named by a
sanitised id plus a hash of the exact id (so ids that sanitise alike never share a file), holding a
fingerprint of the sample's caption and pixels: a row whose sample changed (another data subset,
other preprocessing of the same id) counts as missing and is recomputed, never returned.
Files are written atomically (temporary file + rename) as soon as their batch finishes, so an
interrupted run loses at most the batch in flight and a re-run computes only what is missing; a change
of metric never recomputes maps.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from importlib import metadata as _md
from pathlib import Path
from typing import Sequence

import torch

from m2ib.core.records import Attribution, Sample

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ROOT = Path(__file__).resolve().parents[2]
#: Code whose change changes maps (metrics, tables and figures are deliberately not in it).
_MAP_CODE = ("m2ib/core/*.py", "m2ib/models/*.py", "m2ib/method/*.py", "baselines/*.py")
_NOT_MAP_CODE = ("figures.py", "metric.py")


def config_key(payload: dict) -> str:
    """Stable short hash of a JSON-serialisable description."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the source files that compute maps, plus torch and open_clip versions."""
    h = hashlib.sha256()
    for pattern in _MAP_CODE:
        for path in sorted(_ROOT.glob(pattern)):
            if path.name not in _NOT_MAP_CODE:
                h.update(str(path.relative_to(_ROOT)).encode() + path.read_bytes())
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

    def path(self, sample_id: str) -> Path:
        digest = hashlib.sha1(sample_id.encode()).hexdigest()[:10]
        return self.dir / f"{_SAFE.sub('_', sample_id)[:80]}-{digest}.pt"

    def _load(self, sample: Sample):
        path = self.path(sample.id)
        if not path.exists():
            return None
        row = torch.load(path, weights_only=False)
        return row if row.get("fingerprint") == fingerprint(sample) else None

    def missing(self, samples: Sequence[Sample]) -> list[Sample]:
        """Samples with no cached row, or whose cached row was computed for other pixels or caption."""
        return [s for s in samples if self._load(s) is None]

    def put(self, samples: Sequence[Sample], attribution: Attribution) -> None:
        """Store each row of a batch's Attribution under its sample."""
        for i, sample in enumerate(samples):
            row = {
                "fingerprint": fingerprint(sample),
                "image": None if attribution.image is None else attribution.image[i].clone(),
                "text": None if attribution.text is None else attribution.text[i].clone(),
                "tokens": attribution.tokens[i],
                "token_mask": attribution.token_mask[i].clone(),
                "seconds": attribution.seconds / len(samples),
            }
            target = self.path(sample.id)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            torch.save(row, tmp)
            os.replace(tmp, target)

    def get(self, samples: Sequence[Sample]) -> Attribution:
        """The cached rows of samples, in order, as one Attribution (meta['cache_key'] names the folder)."""
        rows = [self._load(s) for s in samples]
        stale = [s.id for s, r in zip(samples, rows) if r is None]
        if stale:
            raise RuntimeError(f"{self.dir}: no valid cached rows for samples {stale[:5]}")
        width = max(r["token_mask"].shape[0] for r in rows)

        def pad(t):
            return torch.nn.functional.pad(t, (0, width - t.shape[0]))

        image = None if rows[0]["image"] is None else torch.stack([r["image"] for r in rows])
        text = None if rows[0]["text"] is None else torch.stack([pad(r["text"]) for r in rows])
        return Attribution(self.identity["method"], image, text,
                           [r["tokens"] + [""] * (width - len(r["tokens"])) for r in rows],
                           torch.stack([pad(r["token_mask"]) for r in rows]),
                           seconds=sum(r["seconds"] for r in rows),
                           meta={"seconds_per_pair": [r["seconds"] for r in rows], "cache_key": self.key})
