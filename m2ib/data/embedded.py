"""The embedded grounded benchmark: generated shape data in the real file formats (its small CLIP is a
model source: m2ib/models/embedded.py).

Public entry point: load_embedded_split() (registered as data set 'embedded').
Splits are generated on first use into `<repo>/.cache/embedded/` in a source checkout, else (an installed
copy) into the user cache `~/.cache/m2ib-bench/embedded/` (override either with $M2IB_EMBEDDED_CACHE)
and checked against the committed manifest m2ib/assets/embedded/data_manifest.json (hashes of the
CSV/TSV texts and of the decoded pixels), so every machine computes tables on identical data.
Each split folder holds: `<split>.csv` (MS-CXR layout + `target_words` column), `<split>.tsv`
(Conceptual Captions layout), `<split>.text_gt.csv` (text ground truth for the TSV),
`<split>.objects.jsonl` (every object's attributes and box) and `images/*.png`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from m2ib.data.cc import write_cc, write_text_gt
from m2ib.data.generator import GENERATOR_VERSION, IMAGE_SIZE, alternative_caption, generate_pair, pixel_sha256
from m2ib.data.mscxr import TEXT_GT_COLUMN, load_mscxr, write_mscxr
from m2ib.core.errors import DataUnavailableError, InputError
from m2ib.core.paths import missing_asset_message, source_checkout, user_cache_dir
from m2ib.core.progress import progress_bar
from m2ib.core.records import Sample
from m2ib.data.registry import register_dataset

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "embedded"
DATA_MANIFEST = ASSET_DIR / "data_manifest.json"
DATA_SEED = 20231210
SPLIT_SIZES = {"train": 16000, "val": 500, "test": 500}


def cache_dir() -> Path:
    if os.environ.get("M2IB_EMBEDDED_CACHE"):
        return Path(os.environ["M2IB_EMBEDDED_CACHE"])
    root = source_checkout()
    return root / ".cache" / "embedded" if root is not None else user_cache_dir("embedded")


def split_dir(split: str, root: Optional[Path] = None) -> Path:
    return Path(root or cache_dir()) / f"v{GENERATOR_VERSION}-seed{DATA_SEED}" / split


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_split(split: str, out_dir, n: Optional[int] = None, seed: int = DATA_SEED, progress: bool = True) -> Path:
    """Generate `split` and write it in the real formats into out_dir (created)."""
    if split not in SPLIT_SIZES:
        raise InputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    n = SPLIT_SIZES[split] if n is None else n
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples, paths, objects = [], [], []
    for i in progress_bar(range(n), desc=f"generating {split}", unit="pair", enabled=progress):
        p = generate_pair(seed, split, i)
        rel = f"images/{p.id}.png"
        image = Image.fromarray(p.image)
        image.save(out / rel)
        samples.append(Sample(id=p.id, image=image, caption=p.caption, boxes=p.boxes,
                              target_words=p.target_words, category=p.category))
        paths.append(rel)
        objects.append({"id": p.id, "target": list(p.target),
                        "size_in_caption": len(p.target_words) == 3,
                        "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size, "box": list(o.box)}
                                    for o in p.objects]})
    write_mscxr(out / f"{split}.csv", samples, paths, extra_columns=[TEXT_GT_COLUMN])
    write_cc(out / f"{split}.tsv", [s.caption for s in samples], paths)
    write_text_gt(out / f"{split}.text_gt.csv", paths, [s.target_words for s in samples])
    with open(out / f"{split}.objects.jsonl", "w", encoding="utf-8") as fh:
        for rec in objects:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
    return out


def _text_files(split: str, folder: Path) -> dict[str, Path]:
    return {k: folder / f"{split}.{k}" for k in ("csv", "tsv", "text_gt.csv", "objects.jsonl")}


def _image_hash(path: Path) -> str:
    with Image.open(path) as im:
        return pixel_sha256(np.asarray(im.convert("RGB")))


def file_hashes(split: str, folder) -> dict[str, str]:
    """Relative path -> hash for every file of a split folder: sha256 of the bytes of the text files,
    of the decoded pixels of the images (so re-encoding a PNG losslessly is not a change)."""
    folder = Path(folder)
    out = {}
    for f in _text_files(split, folder).values():
        if not f.is_file():
            raise DataUnavailableError(f"embedded split file {f} is missing")
        out[f.name] = _sha256_file(f)
    for p in sorted((folder / "images").glob("*.png")):
        out[f"images/{p.name}"] = _image_hash(p)
    return out


def digest_split(split: str, folder, hashes: Optional[dict] = None) -> dict:
    """What the manifest records for a split folder: text-file hashes and one hash over all pixels."""
    hashes = hashes or file_hashes(split, folder)
    pixels = hashlib.sha256()
    images = sorted(k for k in hashes if k.startswith("images/"))
    for k in images:
        pixels.update(hashes[k].encode())
    return {"n": len(images), **{f"{k}_sha256": hashes[f.name] for k, f in _text_files(split, Path(folder)).items()},
            "pixels_sha256": pixels.hexdigest()}


def _stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _reverify(split: str, folder: Path, stamp: Path, expected: dict) -> bool:
    """Whether the verified split in `folder` is unchanged. Cheap on reuse: only files whose size or
    modification time differ from the stamp are hashed again; a file whose content changed (or is
    missing, or was added) is an error naming it. Returns False when the stamp is of another manifest."""
    record = json.loads(stamp.read_text())
    if record.get("manifest") != expected or "files" not in record:
        return False
    changed, touched = [], False
    for rel, (h, st) in record["files"].items():
        path = folder / rel
        if not path.is_file():
            changed.append(f"{rel} (missing)")
        elif _stat(path) != st:
            if (_image_hash(path) if rel.startswith("images/") else _sha256_file(path)) != h:
                changed.append(rel)
            else:
                record["files"][rel][1], touched = _stat(path), True
    extra = sorted(f"images/{p.name}" for p in (folder / "images").glob("*.png"))
    changed += [f"{rel} (added)" for rel in extra if rel not in record["files"]]
    if changed:
        raise InputError(f"embedded split {split!r} in {folder} was modified since it was generated and verified "
                         f"against {DATA_MANIFEST}: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}; "
                         f"delete {folder} to regenerate it")
    if touched:
        stamp.write_text(json.dumps(record))
    return True


def read_manifest() -> dict:
    if not DATA_MANIFEST.is_file():
        raise DataUnavailableError(missing_asset_message(DATA_MANIFEST, "the embedded data manifest", "recreate it "
                                                         "from a clone with python scripts/make_embedded_data.py --write-manifest"))
    return json.loads(DATA_MANIFEST.read_text())


def ensure_split(split: str, root: Optional[Path] = None, progress: bool = True) -> Path:
    """The split's folder, generated and verified against the manifest on first use."""
    if split not in SPLIT_SIZES:
        raise InputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    manifest = read_manifest()
    expected = manifest.get("splits", {}).get(split)
    if expected is None or manifest.get("seed") != DATA_SEED or manifest.get("generator_version") != GENERATOR_VERSION:
        raise DataUnavailableError(f"{DATA_MANIFEST} has no entry for split {split!r} with seed {DATA_SEED} and "
                                   f"generator version {GENERATOR_VERSION}; run scripts/make_embedded_data.py --write-manifest")
    final = split_dir(split, root)
    stamp = final / ".verified.json"
    if stamp.is_file() and _reverify(split, final, stamp, expected):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=final.parent))
    try:
        write_split(split, tmp, progress=progress)
        hashes = file_hashes(split, tmp)
        got = digest_split(split, tmp, hashes)
        if got != expected:
            bad = sorted(k for k in expected if got.get(k) != expected.get(k))
            raise InputError(f"generated embedded split {split!r} differs from {DATA_MANIFEST} in {bad}: this "
                             f"machine's numpy/scikit-image/Pillow draw different data, so results would not "
                             f"be comparable (got {got})")
        files = {rel: [h, _stat(tmp / rel)] for rel, h in hashes.items()}
        (tmp / ".verified.json").write_text(json.dumps({"manifest": expected, "files": files}))
        if final.exists():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / ".verified.json").is_file():   # another process did not win the race either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@register_dataset("embedded")
def load_embedded_split(split: str = "test", limit: Optional[int] = None, root: Optional[Path] = None,
                        progress: bool = True) -> list[Sample]:
    """The generated shapes benchmark (bundled, MS-CXR layout with boxes and target words).

    Samples of a split read back through the MS-CXR loader; meta gets every object of the image
    (meta['objects']), the target's attributes (meta['target']), whether the size is in the caption, and
    a caption naming another object of the image (meta['alternative'], or None)."""
    folder = ensure_split(split, root, progress=progress)
    samples = load_mscxr(folder / f"{split}.csv", folder, limit=limit, progress=progress)
    extra = {}
    with open(folder / f"{split}.objects.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            extra[rec["id"]] = rec
    for s in samples:
        rec = extra[s.id]
        s.meta.update(objects=rec["objects"], target=tuple(rec["target"]), size_in_caption=rec["size_in_caption"],
                      split=split, alternative=alternative_caption(s.caption, s.target_words, rec["target"],
                                                                   rec["objects"], rec["size_in_caption"]))
    return samples


__all__ = ["load_embedded_split", "ensure_split", "write_split", "digest_split", "IMAGE_SIZE"]
