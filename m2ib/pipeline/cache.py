"""A per-sample on-disk cache of attributions, keyed by everything that determines them.

Key = hash of (model identity, method name, method's resolved hyperparameters, run seed). Each sample
is its own file, written atomically (temporary file + rename) as soon as its batch finishes, so an
interrupted run loses at most the batch in flight and a re-run computes only what is missing; a change
of metric never recomputes maps.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from m2ib.types import Attribution

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def config_key(payload: dict) -> str:
    """Stable short hash of a JSON-serialisable description."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class AttributionCache:
    """Folder `<root>/<method>-<key>/` with one `<sample id>.pt` per sample and a `key.json`."""

    def __init__(self, root, method: str, identity: dict):
        self.identity = {"method": method, **identity}
        self.dir = Path(root) / f"{method}-{config_key(self.identity)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            key_file.write_text(json.dumps(self.identity, sort_keys=True, indent=1, default=str))

    def path(self, sample_id: str) -> Path:
        return self.dir / f"{_SAFE.sub('_', sample_id)}.pt"

    def missing(self, sample_ids: Iterable[str]) -> list[str]:
        return [s for s in sample_ids if not self.path(s).exists()]

    def put(self, sample_ids: Sequence[str], attribution: Attribution) -> None:
        """Store each row of a batch's Attribution under its sample id."""
        for i, sid in enumerate(sample_ids):
            row = {
                "image": None if attribution.image is None else attribution.image[i].clone(),
                "text": None if attribution.text is None else attribution.text[i].clone(),
                "tokens": attribution.tokens[i],
                "token_mask": attribution.token_mask[i].clone(),
                "seconds": attribution.seconds / len(sample_ids),
            }
            target = self.path(sid)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            torch.save(row, tmp)
            os.replace(tmp, target)

    def get(self, sample_ids: Sequence[str]) -> Attribution:
        """The cached rows of sample_ids, in order, as one Attribution."""
        rows = [torch.load(self.path(s), weights_only=False) for s in sample_ids]
        width = max(r["token_mask"].shape[0] for r in rows)

        def pad(t):
            return torch.nn.functional.pad(t, (0, width - t.shape[0]))

        image = None if rows[0]["image"] is None else torch.stack([r["image"] for r in rows])
        text = None if rows[0]["text"] is None else torch.stack([pad(r["text"]) for r in rows])
        return Attribution(self.identity["method"], image, text,
                           [r["tokens"] + [""] * (width - len(r["tokens"])) for r in rows],
                           torch.stack([pad(r["token_mask"]) for r in rows]),
                           seconds=sum(r["seconds"] for r in rows),
                           meta={"seconds_per_pair": [r["seconds"] for r in rows]})
