"""A cache of each (method, metric)'s rows, so an interrupted run resumes after the last finished metric.

Maps are cached per sample (cache.py); scoring them can cost as much again (ROAD, caption sensitivity,
the sanity check's re-runs), so each metric's rows for one method are stored as soon as they are
computed, and a re-run of the same command (or a report rebuilt from the same config) reads them back
bit for bit instead of scoring again.

Key = hash of (the attribution cache folder, which already covers the model, the method and its resolved
hyperparameters, the run seed and the code that computes maps; the metric's name and resolved parameters;
the evaluated samples' ids, captions and pixels; the source of the whole library, so any code change
rescores). One `.npz` per key under `<cache_dir>/metric-rows/`, read with allow_pickle=False: one array
per column (numbers and booleans as they are, strings as unicode with a missing mask, per-pair curves as their concatenated
values plus lengths). Rows that do not fit that shape are simply not cached. A damaged file is reported
once, deleted and rescored.
"""
from __future__ import annotations

import json
import logging
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from m2ib.pipeline.cache import config_key, sources_hash, write_npz

log = logging.getLogger(__name__)
_CODE = ("m2ib/**/*.py", "metrics/*.py", "baselines/*.py")
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)
#: column kinds stored in the file's "__kinds__" array
_NUMBER, _STRING, _CURVE = "n", "s", "c"


@lru_cache(maxsize=1)
def library_version() -> str:
    return sources_hash(_CODE).hexdigest()[:16]


class MetricRowsCache:
    """`<root>/metric-rows/<metric>-<key>.npz`: one method's rows of one metric."""

    def __init__(self, root, attribution_key: str, label: str, metric: str, params: dict, data: str):
        """data: the evaluated samples' fingerprint (provenance.data_fingerprint, computed once per run)."""
        identity = {"attribution": attribution_key, "label": label, "metric": metric, "params": params,
                    "samples": data, "code": library_version()}
        self.path = Path(root) / "metric-rows" / f"{metric}-{config_key(identity)}.npz"

    def get(self) -> Optional[tuple[pd.DataFrame, float]]:
        """(rows, seconds it took to score them), or None where not cached (or damaged)."""
        if not self.path.exists():
            return None
        try:
            return _decode(self.path)
        except _UNREADABLE as e:
            log.warning("damaged metric rows %s (%s: %s); deleting them, they will be rescored",
                        self.path, type(e).__name__, e)
            self.path.unlink(missing_ok=True)
            return None

    def put(self, rows: pd.DataFrame, seconds: float) -> None:
        arrays = _encode(rows)
        if arrays is None:
            log.debug("metric rows with columns %s are not cacheable; they will be rescored on a re-run", list(rows))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(self.path, {**arrays, "__seconds__": np.array(float(seconds))})


def _encode(rows: pd.DataFrame) -> Optional[dict]:
    arrays, kinds = {}, []
    for i, column in enumerate(rows.columns):
        values = rows[column].to_numpy()
        if values.dtype.kind in "biuf":
            kinds.append(_NUMBER)
            arrays[f"c{i}"] = values
        elif all(isinstance(v, str) or v is None or v is pd.NA or (isinstance(v, float) and v != v) for v in values):
            kinds.append(_STRING)
            missing = np.array([not isinstance(v, str) for v in values], dtype=bool)
            arrays[f"c{i}"] = np.array(["" if m else v for v, m in zip(values, missing)], dtype=str)
            arrays[f"c{i}_missing"] = missing
        elif (len(values) and all(isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind == "f" for v in values)
              and len({v.dtype for v in values}) == 1):
            kinds.append(_CURVE)
            arrays[f"c{i}"] = np.concatenate(list(values))
            arrays[f"c{i}_lengths"] = np.array([len(v) for v in values], dtype=np.int64)
        else:
            return None
    arrays["__columns__"] = np.array([json.dumps(str(c)) for c in rows.columns], dtype=str)
    arrays["__kinds__"] = np.array(kinds, dtype=str)
    return arrays


def _decode(path: Path) -> pd.DataFrame:
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        columns = [json.loads(c) for c in z["__columns__"].tolist()]
        seconds = float(z["__seconds__"])
        kinds = z["__kinds__"].tolist()
        if len(kinds) != len(columns):
            raise ValueError("columns and kinds differ in number")
        data = {}
        for i, (column, kind) in enumerate(zip(columns, kinds)):
            if kind == _CURVE:
                values, lengths = z[f"c{i}"], z[f"c{i}_lengths"]
                if lengths.sum() != len(values):
                    raise ValueError(f"curve column {column!r} is truncated")
                data[column] = list(np.split(values, np.cumsum(lengths)[:-1]))
            elif kind == _NUMBER:
                data[column] = z[f"c{i}"]
            elif kind == _STRING:
                data[column] = [None if m else v for v, m in zip(z[f"c{i}"].tolist(), z[f"c{i}_missing"].tolist())]
            else:
                raise ValueError(f"unknown column kind {kind!r}")
    lengths = {len(v) for v in data.values()}
    if len(lengths) > 1:
        raise ValueError("columns differ in length")
    return pd.DataFrame(data, columns=columns), seconds
