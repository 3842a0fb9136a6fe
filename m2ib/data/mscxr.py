"""Loader (and writer) for the MS-CXR phrase-grounding CSV layout.

The real file (PhysioNet MS-CXR, credentialed) has the columns
`dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height`, one row per box,
several rows per (image, phrase) pair; `path` is relative to a MIMIC-CXR-JPG root; boxes are in
original pixels. The embedded benchmark is written in the same layout (plus an optional
`target_words` side column), so this one loader serves both.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from m2ib.core.errors import DataUnavailableError, InputError
from m2ib.core.progress import progress_bar
from m2ib.core.records import Sample
from m2ib.data.registry import register_dataset

REQUIRED_COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                    "image_width", "image_height")
TEXT_GT_COLUMN = "target_words"


def _number(value: str, column: str, where: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: column {column!r} is not a number: {value!r}") from None
    if not np.isfinite(out):
        raise InputError(f"{where}: column {column!r} is not finite: {value!r}")
    return out


def _open_image(path: Path, where: str, max_side: Optional[int]) -> tuple[Image.Image, float, tuple[int, int]]:
    """The image (optionally downscaled so its longer side is at most max_side), the scale used and
    the size on disk."""
    if not path.is_file():
        raise DataUnavailableError(f"{where}: image file {path} does not exist (check image_root; for "
                                   f"MS-CXR it is the MIMIC-CXR-JPG folder that contains 'files/')")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except Exception as exc:   # PIL raises many types for corrupt files
        raise InputError(f"{where}: cannot read image {path}: {exc}") from exc
    scale, on_disk = 1.0, image.size
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
    return image, scale, on_disk


@register_dataset('mscxr')
def load_mscxr(csv_path, image_root, limit: Optional[int] = None, max_side: Optional[int] = None,
               box_tolerance: float = 1.0, progress: bool = True) -> list[Sample]:
    """Read an MS-CXR-layout CSV into one Sample per (image, phrase) pair, with all its boxes.

    limit: keep the first `limit` pairs (in file order). max_side: downscale large images (MIMIC-CXR
    JPGs are ~3000 px; 1,047 of them do not fit in memory at full size) and scale the boxes with them
    (meta['scale'] records it). box_tolerance: boxes may exceed the image by this many pixels (then they
    are clipped); beyond it the row is rejected. Rows are grouped by (dicom_id, label_text); extra
    columns go to Sample.meta, a `target_words` column (space separated) to Sample.target_words.
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    if not csv_path.is_file():
        raise DataUnavailableError(
            f"MS-CXR CSV {csv_path} does not exist. Download MS_CXR_Local_Alignment_v1.0.0.csv from PhysioNet "
            f"(https://physionet.org/content/ms-cxr/, credentialed access), put it there or set the config key "
            f"data.csv_path (or $M2IB_DATA); the embedded benchmark needs no download (data=embedded)")
    if not image_root.is_dir():
        raise DataUnavailableError(f"image root {image_root} (for {csv_path}) is not a folder: put the MIMIC-CXR-JPG "
                                   f"folder (with 'files/') there or set the config key data.image_root")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:     # -sig: tolerate a BOM
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {missing}; found {header}; expected the MS-CXR "
                             f"layout {list(REQUIRED_COLUMNS)}")
        groups: dict[tuple[str, str], dict] = {}
        for row_no, row in enumerate(reader, start=1):
            where = f"{csv_path} row {row_no} (line {reader.line_num})"
            if None in row or any(row.get(c) is None for c in REQUIRED_COLUMNS):
                raise InputError(f"{where}: expected {len(header)} fields, the row has a different number")
            for c in ("dicom_id", "label_text", "path"):
                if not row[c].strip():
                    raise InputError(f"{where}: column {c!r} is empty")
            x, y, w, h, iw, ih = (_number(row[c], c, where) for c in ("x", "y", "w", "h", "image_width", "image_height"))
            if w <= 0 or h <= 0:
                raise InputError(f"{where}: box has non-positive size w={w}, h={h}")
            if iw <= 0 or ih <= 0:
                raise InputError(f"{where}: image size must be positive, got {iw}x{ih}")
            t = box_tolerance
            if x < -t or y < -t or x + w > iw + t or y + h > ih + t:
                raise InputError(f"{where}: box (x={x}, y={y}, w={w}, h={h}) lies outside the image "
                                 f"({iw:g}x{ih:g} pixels) of {row['path']}")
            x0, y0 = max(x, 0.0), max(y, 0.0)
            box = (x0, y0, min(x + w, iw) - x0, min(y + h, ih) - y0)
            key = (row["dicom_id"], row["label_text"])
            g = groups.get(key)
            if g is None:
                if limit is not None and len(groups) >= limit:
                    continue
                g = groups[key] = {"row": row, "where": where, "boxes": [], "size": (iw, ih)}
            elif row["path"] != g["row"]["path"] or (iw, ih) != g["size"]:
                raise InputError(f"{where}: rows of pair {key[0]!r} / {key[1]!r} disagree on path or image "
                                 f"size (first seen at {g['where']})")
            g["boxes"].append(box)
    if not groups:
        raise InputError(f"{csv_path}: no rows")

    per_image: dict[str, int] = {}
    for dicom_id, _ in groups:
        per_image[dicom_id] = per_image.get(dicom_id, 0) + 1
    seen: dict[str, int] = {}
    samples = []
    items = progress_bar(groups.items(), desc=f"loading {csv_path.name}", total=len(groups),
                         enabled=progress and len(groups) >= 200)
    for (dicom_id, label_text), g in items:
        row, where = g["row"], g["where"]
        image, scale, on_disk = _open_image(image_root / row["path"], where, max_side)
        iw, ih = g["size"]
        if on_disk != (round(iw), round(ih)):
            raise InputError(f"{where}: image {image_root / row['path']} is {on_disk[0]}x{on_disk[1]} "
                             f"pixels but the CSV says {iw:g}x{ih:g}")
        k = seen.get(dicom_id, 0)
        seen[dicom_id] = k + 1
        sid = dicom_id if per_image[dicom_id] == 1 else f"{dicom_id}#{k}"
        extra = {c: v for c, v in row.items() if c not in REQUIRED_COLUMNS and c != TEXT_GT_COLUMN}
        words = row.get(TEXT_GT_COLUMN)
        target_words = words.split() if words and words.strip() else None
        if target_words:
            lower = label_text.lower().split()
            absent = [wd for wd in target_words if wd.lower() not in lower]
            if absent:
                raise InputError(f"{where}: target word(s) {absent} do not occur in the caption {label_text!r}")
        boxes = np.asarray(g["boxes"], dtype=np.float32).reshape(-1, 4) * np.float32(scale)
        samples.append(Sample(id=sid, image=image, caption=label_text, boxes=boxes, target_words=target_words,
                              category=row["category_name"] or None,
                              meta={"path": row["path"], "source": str(csv_path), "scale": scale,
                                    "original_size": (int(iw), int(ih)), **extra}))
    return samples


def write_mscxr(csv_path, samples: Iterable[Sample], paths: Sequence[str], extra_columns: Sequence[str] = ()) -> None:
    """Write samples in the MS-CXR layout, one row per box (a pair without boxes is not representable).

    paths: image path of each sample relative to the image root. extra_columns: Sample.meta keys (or
    'target_words') written after the standard columns.
    """
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(list(REQUIRED_COLUMNS) + list(extra_columns))
        for s, path in zip(samples, paths):
            boxes = np.asarray(s.boxes, dtype=np.float64).reshape(-1, 4)
            if len(boxes) == 0:
                raise InputError(f"sample {s.id}: the MS-CXR layout needs at least one box")
            extra = []
            for c in extra_columns:
                extra.append(" ".join(s.target_words or []) if c == TEXT_GT_COLUMN else str(s.meta.get(c, "")))
            for x, y, w, h in boxes:
                out.writerow([s.id, s.category or "", s.caption, path, f"{x:g}", f"{y:g}", f"{w:g}", f"{h:g}",
                              s.image.width, s.image.height] + extra)

