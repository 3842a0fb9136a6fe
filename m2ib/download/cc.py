"""Conceptual Captions (validation) downloader: seeded sample, parallel fetch, manifest.

Input: the CC validation TSV (`caption<TAB>url`, no header, ~15.8k rows; Sharma et al. 2018,
'Validation_GCC-1.1.0-Validation.tsv'). Many URLs are dead by now, so the evaluated subset is
pinned by what this writes into the output folder:
  images/<sha256(url)[:24]>.<ext>  the downloaded, verified images (the image root)
  manifest.csv                     url,path,sha256,status: 'ok' for exactly the N selected pairs, plus
                                   every failure met (dead, corrupt, timeout); path is relative to
                                   images/ (absolute for --from-folder files outside it)
  subset.tsv                       the N selected pairs (`caption<TAB>url`, TSV order)
  download_meta.json               seed, N, source TSV hash, counts (provenance)
Evaluate with m2ib.data.cc.load_cc(out/'subset.tsv' (or the full TSV: rows not 'ok' in the manifest
are skipped), out/'images', manifest=out/'manifest.csv').

Selection is deterministic given the TSV and the seed: rows are visited in the order of a seeded
permutation and the first N that yield a valid image are kept. Downloads run in parallel, but the
selection reads results in permutation order, so it does not depend on which thread finished first.
Resuming: a row whose manifest entry is 'ok' and whose file still has the recorded sha256, or whose
images/<hash>.* file is already a valid image, is not fetched again; 'dead'/'corrupt' rows are not
retried unless retry_failed=True ('timeout' rows are).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image

from m2ib.core.errors import DataUnavailableError, InputError
from m2ib.core.progress import progress_bar

MANIFEST_COLUMNS = ("url", "path", "sha256", "status")
STATUSES = ("ok", "dead", "corrupt", "timeout")
USER_AGENT = "m2ib-bench-cc-downloader/0.1 (research; +https://ai.google.com/research/ConceptualCaptions/)"
RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}
FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class Row:
    line: int          # 1-based line number in the TSV
    caption: str
    url: str


@dataclass
class Result:
    url: str
    path: str = ""
    sha256: str = ""
    status: str = "dead"
    detail: str = ""
    fetched: bool = False


@dataclass
class Summary:
    selected: list[Row] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    fetched: int = 0

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for r in self.results.values():
            out[r.status] += 1
        return out


# ---- input -----------------------------------------------------------------------------------------
def read_tsv(path) -> list[Row]:
    """All rows of a CC TSV; a malformed line raises InputError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(
            f"Conceptual Captions TSV {path} does not exist. Get 'Validation_GCC-1.1.0-Validation.tsv' from "
            f"https://ai.google.com/research/ConceptualCaptions/download and pass its path with --tsv")
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise InputError(f"{path} line {line_no}: expected 'caption<TAB>url' (2 fields), found {len(fields)}")
            caption, url = fields[0].strip(), fields[1].strip()
            if not caption:
                raise InputError(f"{path} line {line_no}: empty caption")
            if not url.startswith(("http://", "https://")):
                raise InputError(f"{path} line {line_no}: second field is not an http(s) URL: {url[:80]!r}")
            rows.append(Row(line_no, caption, url))
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def visit_order(n_rows: int, seed: int) -> list[int]:
    """The seeded order in which rows are tried (numpy PCG64: the same on every platform)."""
    return np.random.default_rng(seed).permutation(n_rows).tolist()


def file_name(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_format(data: bytes) -> Optional[str]:
    """The PIL format name if `data` is a complete, decodable image, else None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:      # verify() misses truncated pixel data
            im.load()
            fmt = im.format
            if im.width < 1 or im.height < 1:
                return None
        return fmt
    except Exception:
        return None


# ---- manifest -------------------------------------------------------------------------------------------
def read_manifest(path) -> dict[str, Result]:
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
        out = {}
        for row_no, row in enumerate(reader, start=1):
            if None in row or row.get("status") not in STATUSES:
                raise InputError(f"{path} row {row_no}: bad row {dict(row)} (status must be one of {STATUSES})")
            out[row["url"]] = Result(row["url"], row["path"], row["sha256"], row["status"])
    return out


def write_manifest(path, results: Iterable[Result]) -> None:
    """Atomic write (temporary file + rename), so an interrupted run never leaves half a manifest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(MANIFEST_COLUMNS)
        for r in results:
            out.writerow([r.url, r.path, r.sha256, r.status])
    os.replace(tmp, path)


# ---- fetching -------------------------------------------------------------------------------------------
def fetch(url: str, timeout: float, retries: int, max_bytes: int, backoff: float = 1.0) -> tuple[str, bytes, str]:
    """(status, body, detail): 'ok' with the body, 'dead' (HTTP error / refused / too large) or 'timeout'.

    Retries (with exponential backoff and jitter) only what can recover: timeouts, connection
    resets and HTTP 408/425/429/5xx. `timeout` bounds each socket operation; the whole transfer
    is bounded by 3x timeout so a server that drips bytes cannot hold a worker forever.
    """
    last = ("dead", b"", "no attempt")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * (2 ** (attempt - 1)) * (1 + random.random() * 0.25))
        try:
            req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            start = time.monotonic()
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    return "dead", b"", f"too large ({length} bytes > {max_bytes})"
                chunks, size = [], 0
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > max_bytes:
                        return "dead", b"", f"too large (> {max_bytes} bytes)"
                    if time.monotonic() - start > 3 * timeout:
                        raise socket.timeout("transfer exceeded 3x timeout")
                return "ok", b"".join(chunks), ""
        except urllib.error.HTTPError as exc:
            last = ("dead", b"", f"HTTP {exc.code}")
            if exc.code not in RETRY_HTTP:
                return last
        except (socket.timeout, TimeoutError) as exc:
            last = ("timeout", b"", f"timeout: {exc}")
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                last = ("timeout", b"", f"timeout: {exc.reason}")
            else:
                last = ("dead", b"", f"URL error: {exc.reason}")
                if not isinstance(exc.reason, (ConnectionResetError, ConnectionAbortedError)):
                    return last
        except (ConnectionError, OSError, ValueError) as exc:   # resets mid-body, malformed URLs
            last = ("dead", b"", f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, (ConnectionResetError, ConnectionAbortedError)):
                return last
    return last


def download_one(url: str, image_dir: Path, timeout: float, retries: int, max_bytes: int,
                 backoff: float = 1.0) -> Result:
    status, body, detail = fetch(url, timeout, retries, max_bytes, backoff)
    if status != "ok":
        return Result(url, status=status, detail=detail, fetched=True)
    fmt = image_format(body)
    if fmt is None:
        return Result(url, status="corrupt", detail="not a decodable image", fetched=True)
    name = file_name(url) + FORMAT_EXT.get(fmt, "." + fmt.lower())
    dest = image_dir / name
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    tmp.write_bytes(body)
    os.replace(tmp, dest)
    return Result(url, name, hashlib.sha256(body).hexdigest(), "ok", fetched=True)


def _still_valid(image_dir: Path, rec: Result) -> bool:
    if rec.status != "ok" or not rec.path:
        return False
    file = Path(rec.path) if Path(rec.path).is_absolute() else image_dir / rec.path
    return file.is_file() and sha256_file(file) == rec.sha256


def _on_disk(url: str, image_dir: Path) -> Optional[Result]:
    """A valid image already saved under this URL's name (e.g. fetched by an interrupted run)."""
    for file in sorted(image_dir.glob(file_name(url) + ".*")):
        if ".part" in file.name:
            continue
        data = file.read_bytes()
        if image_format(data) is not None:
            return Result(url, file.name, hashlib.sha256(data).hexdigest(), "ok")
    return None


# ---- an already downloaded folder ------------------------------------------------------------------------------
def index_folder(folder: Path) -> dict[str, Path]:
    """url -> image file in a folder downloaded earlier: this tool's layout (manifest.csv, or
    images/<sha256(url)[:24]>.*) or img2dataset's (each image with a .json sidecar holding 'url')."""
    found: dict[str, Path] = {}
    by_hash: dict[str, Path] = {}
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        if p.suffix.lower() == ".json" and p.name != "download_meta.json":
            try:
                meta = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            url = meta.get("url") if isinstance(meta, dict) else None
            if url:
                imgs = [q for q in p.parent.glob(p.stem + ".*") if q.suffix.lower() not in (".json", ".txt")]
                if imgs:
                    found[url] = imgs[0]
        elif len(p.stem) == 24 and p.suffix.lower() in {e for e in FORMAT_EXT.values()}:
            by_hash[p.stem] = p
    return {**{"#" + k: v for k, v in by_hash.items()}, **found}


def _from_folder_result(url: str, index: dict[str, Path], image_dir: Path) -> Result:
    file = index.get(url) or index.get("#" + file_name(url))
    if file is None:
        return Result(url, status="dead", detail="not in the folder")
    data = file.read_bytes()
    if image_format(data) is None:
        return Result(url, status="corrupt", detail=f"{file} is not a decodable image")
    try:
        rel = file.resolve().relative_to(image_dir.resolve()).as_posix()
    except ValueError:
        rel = str(file.resolve())
    return Result(url, rel, hashlib.sha256(data).hexdigest(), "ok")


# ---- the whole job ----------------------------------------------------------------------------------------------
def download_cc(tsv, out_dir, n: Optional[int] = None, seed: int = 0, workers: int = 16, timeout: float = 10.0,
                retries: int = 2, max_bytes: int = 20 << 20, from_folder=None, retry_failed: bool = False,
                backoff: float = 1.0, progress: bool = True,
                log: Callable[[str], None] = print) -> Summary:
    """Select (seeded) and fetch up to `n` valid pairs of `tsv` into `out_dir`; see the module docstring.

    n=None takes every row. from_folder: build the manifest from images already on disk instead of
    the network (no row is fetched). Returns the selection and every row's result.
    """
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1):
        raise InputError(f"n must be a positive integer, got {n!r}")
    if workers < 1 or timeout <= 0 or retries < 0:
        raise InputError(f"workers >= 1, timeout > 0 and retries >= 0 needed, got {workers}, {timeout}, {retries}")
    rows = read_tsv(tsv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_dir = out_dir / "images"
    manifest_path = out_dir / "manifest.csv"
    known = read_manifest(manifest_path)
    index = None
    if from_folder is not None:
        folder = Path(from_folder)
        if not folder.is_dir():
            raise DataUnavailableError(f"--from-folder {folder} is not a folder")
        index = index_folder(folder)
        if (folder / "manifest.csv").is_file():
            for url, rec in read_manifest(folder / "manifest.csv").items():
                if rec.status == "ok" and rec.path:
                    index.setdefault(url, Path(rec.path) if Path(rec.path).is_absolute()
                                     else folder / "images" / rec.path)
        known = {}   # judge every file afresh
    target = len(rows) if n is None else min(int(n), len(rows))
    order = visit_order(len(rows), seed)
    summary = Summary(results=dict(known))

    def resolve(url: str) -> Result:
        if index is not None:
            return _from_folder_result(url, index, image_dir)
        rec = known.get(url)
        if rec is not None:
            if rec.status == "ok" and _still_valid(image_dir, rec):
                return rec
            if rec.status in ("dead", "corrupt") and not retry_failed:
                return rec
        return _on_disk(url, image_dir) or download_one(url, image_dir, timeout, retries, max_bytes, backoff)

    selected_idx: list[int] = []
    selected_urls: set[str] = set()
    resolved: set[str] = set()
    pos = 0
    chunk = max(workers * 4, 16)
    bar = progress_bar(total=target, desc="CC pairs", unit="pair", enabled=progress, leave=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while len(selected_idx) < target and pos < len(order):
            need = target - len(selected_idx)
            # ask for a little more than needed (some links are dead); a local folder is read whole
            size = len(order) if index is not None else max(chunk, int(need * 1.3) + 1)
            batch = order[pos: pos + size]
            pos += len(batch)
            urls = list(dict.fromkeys(rows[i].url for i in batch if rows[i].url not in resolved))
            for url, res in zip(urls, pool.map(resolve, urls)):
                summary.results[url] = res
                summary.fetched += res.fetched
                resolved.add(url)
            for i in batch:                       # selection in permutation order: thread timing has no say
                if len(selected_idx) >= target:
                    break
                url = rows[i].url
                if summary.results[url].status == "ok" and url not in selected_urls:
                    selected_idx.append(i)
                    selected_urls.add(url)
                    bar.update(1)
            write_manifest(manifest_path, _manifest_rows(rows, summary.results, selected_urls))
    bar.close()
    summary.selected = [rows[i] for i in sorted(selected_idx)]
    with open(out_dir / "subset.tsv", "w", encoding="utf-8", newline="") as fh:
        for r in summary.selected:
            fh.write(f"{r.caption}\t{r.url}\n")
    meta = {"source_tsv": str(Path(tsv).resolve()), "source_sha256": sha256_file(Path(tsv)), "seed": seed,
            "n_requested": n, "n_selected": len(summary.selected), "rows_in_tsv": len(rows),
            "rows_tried": len(summary.results), "counts": summary.counts(), "from_folder": str(from_folder or ""),
            "visit_order": "numpy.random.default_rng(seed).permutation(rows_in_tsv)"}
    (out_dir / "download_meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if len(summary.selected) < target:
        log(f"warning: only {len(summary.selected)} of {target} requested pairs have a valid image "
            f"({summary.counts()}); the TSV has no more rows to try")
    log(f"selected {len(summary.selected)} pairs -> {out_dir / 'subset.tsv'}; manifest {manifest_path}; "
        f"statuses {summary.counts()}; fetched {summary.fetched} URL(s) this run")
    return summary


def _manifest_rows(rows: list[Row], results: dict[str, Result], selected: set[str]) -> list[Result]:
    """Manifest rows in TSV order: the selected 'ok' pairs and every failure, one row per URL.
    Valid images fetched beyond N stay on disk (a larger N reuses them) but not in the manifest,
    so the manifest alone pins the evaluated subset."""
    seen, out = set(), []
    for r in rows:
        res = results.get(r.url)
        if res is None or r.url in seen or (res.status == "ok" and r.url not in selected):
            continue
        seen.add(r.url)
        out.append(res)
    return out


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="Download a seeded sample of the Conceptual Captions validation "
                                             "split and write a manifest (url,path,sha256,status).")
    ap.add_argument("--tsv", required=True, help="Validation_GCC-1.1.0-Validation.tsv (caption<TAB>url, no header)")
    ap.add_argument("--out", required=True, help="output folder (images/, manifest.csv, subset.tsv, download_meta.json)")
    ap.add_argument("--n", type=int, default=None, help="number of valid pairs to keep (default: all rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per socket operation")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--max-bytes", type=int, default=20 << 20)
    ap.add_argument("--from-folder", default=None, help="use images already downloaded in this folder; no network")
    ap.add_argument("--retry-failed", action="store_true", help="fetch again rows recorded as dead/corrupt")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        download_cc(args.tsv, args.out, n=args.n, seed=args.seed, workers=args.workers, timeout=args.timeout,
                    retries=args.retries, max_bytes=args.max_bytes, from_folder=args.from_folder,
                    retry_failed=args.retry_failed, progress=not args.no_progress)
    except (InputError, DataUnavailableError) as exc:
        print(f"error: {exc}")
        return 2
    return 0
