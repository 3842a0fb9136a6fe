"""Loader (and writer) for the Conceptual Captions TSV layout: `caption<TAB>path-or-url`, no header.

The real CC validation file lists URLs (many dead by now). A downloader writes a manifest CSV
`url,path,sha256,status`; rows whose URL is in it with status 'ok' are read from `path` (relative to
the image root), others are skipped with a count in a warning. Local paths are read directly. An
optional side CSV `path,target_words` gives the text ground truth (the embedded benchmark writes one).
"""
from __future__ import annotations

import csv
import hashlib
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

from PIL import Image

from m2ib.core.errors import DataUnavailableError, InputError
from m2ib.core.progress import progress_bar
from m2ib.core.records import Sample
from m2ib.data.registry import register_dataset



def _is_url(entry: str) -> bool:
    return entry.startswith(("http://", "https://", "ftp://"))


def _read_manifest(manifest: Path) -> dict:
    """url -> the downloader's manifest record (same reader as the downloader's: one format, one parser)."""
    from m2ib.download.cc import read_manifest
    if not manifest.is_file():
        raise DataUnavailableError(f"download manifest {manifest} does not exist; run the CC downloader first "
                                   f"(scripts/download_cc.py) or point data.manifest at it")
    return read_manifest(manifest)


def _read_text_gt(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DataUnavailableError(f"text ground-truth file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"path", "target_words"} <= set(reader.fieldnames or []):
            raise InputError(f"{path}: expected columns 'path,target_words', found {reader.fieldnames}")
        return {row["path"]: row["target_words"].split() for row in reader}


@register_dataset('cc')
def load_cc(tsv_path, image_root, manifest=None, text_gt=None, limit: Optional[int] = None,
            verify_sha256: bool = False, progress: bool = True) -> list[Sample]:
    """One Sample (no boxes) per usable TSV line; ids are '<tsv stem>:<line number>'.

    manifest: the downloader's CSV mapping URLs to local files (needed when the TSV lists URLs).
    verify_sha256: check each manifest-resolved file against its recorded hash.
    """
    tsv_path, image_root = Path(tsv_path), Path(image_root)
    if not tsv_path.is_file():
        raise DataUnavailableError(
            f"Conceptual Captions TSV {tsv_path} does not exist. Get 'Validation_GCC-1.1.0-Validation.tsv' from "
            f"https://ai.google.com/research/ConceptualCaptions/, fetch a subset with `python scripts/download_cc.py "
            f"--tsv <that file> --out data/cc` (writes subset.tsv, images/ and manifest.csv), and point the config "
            f"key data.tsv_path (or $M2IB_DATA) at it")
    if not image_root.is_dir():
        raise DataUnavailableError(f"image root {image_root} (for {tsv_path}) is not a folder: set the config key "
                                   f"data.image_root to the downloader's images folder")
    urls = _read_manifest(Path(manifest)) if manifest is not None else None
    targets = _read_text_gt(Path(text_gt)) if text_gt is not None else {}
    rows = []
    skipped: dict[str, int] = {}
    with open(tsv_path, encoding="utf-8-sig", newline="") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{tsv_path} line {line_no}"
            fields = line.split("\t")
            if len(fields) != 2:
                raise InputError(f"{where}: expected 'caption<TAB>path-or-url' (2 fields), found {len(fields)}")
            caption, entry = fields[0].strip(), fields[1].strip()
            if not caption or not entry:
                raise InputError(f"{where}: empty caption or path")
            sha = None
            if _is_url(entry):
                if urls is None:
                    raise DataUnavailableError(f"{where}: entry is a URL ({entry[:80]}) but no manifest= was "
                                               f"given; download the images and pass the downloader's manifest")
                rec = urls.get(entry)
                status = rec.status if rec is not None else "not in manifest"
                if status != "ok":
                    skipped[status] = skipped.get(status, 0) + 1
                    continue
                path, sha = rec.path, rec.sha256 or None
            else:
                path = entry
            rows.append((line_no, where, caption, path, sha))
            if limit is not None and len(rows) >= limit:
                break
    if skipped:
        total = sum(skipped.values())
        warnings.warn(f"{tsv_path}: skipped {total} row(s) whose image is not available "
                      f"({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})", stacklevel=2)
    if not rows:
        raise DataUnavailableError(f"{tsv_path}: no usable rows (skipped {sum(skipped.values())})")

    samples = []
    for line_no, where, caption, path, sha in progress_bar(rows, desc=f"loading {tsv_path.name}",
                                                          enabled=progress and len(rows) >= 200):
        file = Path(path) if Path(path).is_absolute() else image_root / path
        if not file.is_file():
            raise DataUnavailableError(f"{where}: image file {file} does not exist")
        data = file.read_bytes()
        if verify_sha256 and sha and hashlib.sha256(data).hexdigest() != sha:
            raise InputError(f"{where}: image {file} does not match its manifest sha256 {sha}")
        try:
            with Image.open(file) as im:
                im.load()
                image = im.copy()
        except Exception as exc:
            raise InputError(f"{where}: cannot read image {file}: {exc}") from exc
        words = targets.get(path)
        samples.append(Sample(id=f"{tsv_path.stem}:{line_no}", image=image, caption=caption,
                              target_words=words or None, meta={"path": path, "source": str(tsv_path)}))
    return samples


def write_cc(tsv_path, captions: Sequence[str], paths: Sequence[str]) -> None:
    """Write `caption<TAB>path` lines (no header); tabs/newlines in captions are not representable."""
    with open(tsv_path, "w", encoding="utf-8", newline="") as fh:
        for i, (c, p) in enumerate(zip(captions, paths)):
            if any(ch in c + p for ch in "\t\r\n"):
                raise InputError(f"row {i}: caption or path contains a tab or newline: {c!r}")
            fh.write(f"{c}\t{p}\n")


def write_text_gt(csv_path, paths: Sequence[str], target_words: Iterable[Sequence[str]]) -> None:
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["path", "target_words"])
        for p, words in zip(paths, target_words):
            out.writerow([p, " ".join(words)])
