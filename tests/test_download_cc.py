"""The CC downloader against a local HTTP server (127.0.0.1 only): fixture images, 404/410 dead
links, corrupt and truncated files, a slow endpoint (timeout) and a flaky one (503, then OK)."""
import csv
import hashlib
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from m2ib.download.cc import MANIFEST_COLUMNS, download_cc, main, read_manifest, read_tsv
from m2ib.core.errors import DataUnavailableError, InputError

N_GOOD = 10


def _jpeg(k: int, fmt="JPEG") -> bytes:
    rng = np.random.default_rng(k)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24 + k, 32, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args):        # keep test output clean
        pass

    def _send(self, code, body=b"", ctype="image/jpeg"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with self.lock:
            self.hits[self.path] += 1
            count = self.hits[self.path]
        p = self.path
        if p.startswith("/img/"):
            k = int(p.split("/")[-1].split(".")[0])
            self._send(200, _jpeg(k, "PNG" if p.endswith(".png") else "JPEG"))
        elif p.startswith("/dead/"):
            self._send(404, b"not found", "text/html")
        elif p == "/gone":
            self._send(410, b"gone", "text/html")
        elif p == "/corrupt.jpg":
            self._send(200, b"\xff\xd8\xff\xe0" + b"this is not really a jpeg" * 10)
        elif p == "/truncated.jpg":
            self._send(200, _jpeg(99)[:300])
        elif p == "/slow.jpg":
            time.sleep(1.5)
            try:
                self._send(200, _jpeg(98))
            except OSError:
                pass
        elif p == "/flaky.jpg":
            if count == 1:
                self._send(503, b"busy", "text/html")
            else:
                self._send(200, _jpeg(97))
        else:
            self._send(404, b"?", "text/html")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


def _write_tsv(path, base):
    lines = [f"caption number {k}\t{base}/img/{k}.{'png' if k % 3 == 0 else 'jpg'}" for k in range(N_GOOD)]
    lines[2:2] = [f"a dead link\t{base}/dead/1", f"a corrupt file\t{base}/corrupt.jpg"]
    lines[6:6] = [f"a gone link\t{base}/gone", f"a slow server\t{base}/slow.jpg", f"a truncated jpeg\t{base}/truncated.jpg"]
    lines.append(f"a flaky server\t{base}/flaky.jpg")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


FAST = dict(timeout=0.4, retries=1, backoff=0.01, workers=4, progress=False, log=lambda *_: None)


def _manifest_rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def test_all_rows_statuses_hashes_and_loader(tmp_path, server):
    tsv = _write_tsv(tmp_path / "val.tsv", server)
    out = tmp_path / "cc"
    summary = download_cc(tsv, out, n=None, seed=0, **FAST)
    header, rows = _manifest_rows(out / "manifest.csv")
    assert tuple(header) == MANIFEST_COLUMNS
    status = {url.split("/", 3)[-1]: st for url, _, _, st in rows}
    assert status["dead/1"] == "dead" and status["gone"] == "dead"
    assert status["corrupt.jpg"] == "corrupt" and status["truncated.jpg"] == "corrupt"
    assert status["slow.jpg"] == "timeout"
    assert status["flaky.jpg"] == "ok"                   # 503 first, retried
    assert sum(st == "ok" for st in status.values()) == N_GOOD + 1
    for url, path, sha, st in rows:
        if st == "ok":
            data = (out / "images" / path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha
            assert path.endswith(".png" if url.endswith(".png") else ".jpg")
        else:
            assert path == "" and sha == ""
    subset = read_tsv(out / "subset.tsv")
    assert [r.url for r in subset] == [r.url for r in read_tsv(tsv) if status[r.url.split("/", 3)[-1]] == "ok"]
    meta = json.loads((out / "download_meta.json").read_text())
    assert meta["counts"] == {"ok": N_GOOD + 1, "dead": 2, "corrupt": 2, "timeout": 1}
    assert len(summary.selected) == N_GOOD + 1

    from m2ib.data.cc import load_cc
    with pytest.warns(UserWarning, match="skipped 5"):
        samples = load_cc(tsv, out / "images", manifest=out / "manifest.csv", progress=False)
    assert [s.caption for s in samples] == [r.caption for r in subset]
    assert samples[0].image.size == (32, 24)


def test_seeded_sample_is_reproducible_and_thread_independent(tmp_path, server):
    tsv = _write_tsv(tmp_path / "val.tsv", server)
    a = download_cc(tsv, tmp_path / "a", n=4, seed=0, **FAST)
    b = download_cc(tsv, tmp_path / "b", n=4, seed=0, **{**FAST, "workers": 1})
    c = download_cc(tsv, tmp_path / "c", n=4, seed=1, **FAST)
    assert len(a.selected) == 4 and [r.url for r in a.selected] == [r.url for r in b.selected]
    assert [r.url for r in a.selected] != [r.url for r in c.selected]
    assert (tmp_path / "a" / "subset.tsv").read_bytes() == (tmp_path / "b" / "subset.tsv").read_bytes()
    man = read_manifest(tmp_path / "a" / "manifest.csv")
    assert {u for u, r in man.items() if r.status == "ok"} == {r.url for r in a.selected}
    # the 4 selected rows are the first 4 valid ones in the seeded visiting order
    rows = read_tsv(tsv)
    order = np.random.default_rng(0).permutation(len(rows))
    bad = ("dead", "gone", "corrupt", "truncated", "slow")
    expected = [rows[i].url for i in order if not any(b_ in rows[i].url for b_ in bad)][:4]
    assert sorted(expected) == sorted(r.url for r in a.selected)


def test_resume_does_not_refetch_and_repairs_changed_files(tmp_path, server):
    tsv = _write_tsv(tmp_path / "val.tsv", server)
    out = tmp_path / "cc"
    download_cc(tsv, out, n=5, seed=3, **FAST)
    before = (out / "manifest.csv").read_bytes()
    hits = Counter(_Handler.hits)
    again = download_cc(tsv, out, n=5, seed=3, **FAST)
    # only the 'timeout' row is tried again (transient); ok rows are reused, dead/corrupt ones are final
    assert again.fetched == 1 and set((Counter(_Handler.hits) - hits)) == {"/slow.jpg"}
    assert (out / "manifest.csv").read_bytes() == before
    # a damaged file (hash mismatch) is fetched again and repaired
    victim = next(r for r in read_manifest(out / "manifest.csv").values() if r.status == "ok")
    (out / "images" / victim.path).write_bytes(b"damaged")
    hits = Counter(_Handler.hits)
    repaired = download_cc(tsv, out, n=5, seed=3, **FAST)
    assert repaired.fetched == 2 and set(Counter(_Handler.hits) - hits) == {"/slow.jpg", "/" + victim.url.split("/", 3)[-1]}
    assert (out / "manifest.csv").read_bytes() == before
    # a file left on disk by an interrupted run (no manifest) is reused, not fetched
    (out / "manifest.csv").unlink()
    hits = Counter(_Handler.hits)
    resumed = download_cc(tsv, out, n=5, seed=3, **{**FAST, "retry_failed": True})
    img_hits = {k: v for k, v in (Counter(_Handler.hits) - hits).items() if k.startswith("/img/")}
    assert img_hits == {}
    assert [r.url for r in resumed.selected] == [r.url for r in again.selected]


def test_no_retry_on_dead_and_retry_budget(tmp_path, server):
    tsv = tmp_path / "t.tsv"
    tsv.write_text(f"x\t{server}/dead/77\n", encoding="utf-8")
    download_cc(tsv, tmp_path / "o", **{**FAST, "retries": 3})
    assert _Handler.hits["/dead/77"] == 1                 # a 404 is final: no retries
    _Handler.hits.pop("/flaky.jpg", None)
    tsv.write_text(f"x\t{server}/flaky.jpg\n", encoding="utf-8")
    s = download_cc(tsv, tmp_path / "p", **{**FAST, "retries": 0})
    assert s.results[f"{server}/flaky.jpg"].status == "dead"   # 503 with no retry budget left


def test_from_folder_own_layout_and_img2dataset(tmp_path, server):
    tsv = _write_tsv(tmp_path / "val.tsv", server)
    first = download_cc(tsv, tmp_path / "net", n=6, seed=0, **FAST)
    hits = Counter(_Handler.hits)
    # 1) this tool's own folder, read into a new output folder without any request
    again = download_cc(tsv, tmp_path / "copy", n=6, seed=0, from_folder=tmp_path / "net", **FAST)
    assert Counter(_Handler.hits) == hits
    assert [r.url for r in again.selected] == [r.url for r in first.selected]
    shas = {u: r.sha256 for u, r in read_manifest(tmp_path / "net" / "manifest.csv").items() if r.status == "ok"}
    assert {u: r.sha256 for u, r in read_manifest(tmp_path / "copy" / "manifest.csv").items() if r.status == "ok"} == shas
    # 2) an img2dataset-style folder: NNNN.jpg + NNNN.json {"url": ...}; one broken file, the rest missing
    folder = tmp_path / "i2d" / "00000"
    folder.mkdir(parents=True)
    rows = read_tsv(tsv)
    for j, k in enumerate([0, 1, 4]):
        url = f"{server}/img/{k}.{'png' if k % 3 == 0 else 'jpg'}"
        (folder / f"{j:04d}.jpg").write_bytes(_jpeg(k) if k != 4 else b"broken")
        (folder / f"{j:04d}.json").write_text(json.dumps({"url": url, "caption": "x"}))
    s = download_cc(tsv, tmp_path / "i2d", n=None, from_folder=tmp_path / "i2d", **FAST)
    assert Counter(_Handler.hits) == hits
    st = {u.split("/", 3)[-1]: r.status for u, r in s.results.items()}
    assert st["img/0.png"] == "ok" and st["img/1.jpg"] == "ok" and st["img/4.jpg"] == "corrupt"
    assert st["img/2.jpg"] == "dead" and len(s.selected) == 2 and len(s.results) == len(rows)


def test_bad_inputs_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ok caption\thttp://127.0.0.1:9/x.jpg\ntoo\tmany\tfields\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.tsv line 2"):
        read_tsv(bad)
    bad.write_text("a caption\tnot-a-url\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"line 1.*not an http"):
        read_tsv(bad)
    with pytest.raises(DataUnavailableError, match="Validation_GCC-1.1.0-Validation.tsv"):
        read_tsv(tmp_path / "missing.tsv")
    with pytest.raises(InputError, match="n must be"):
        download_cc(tmp_path / "bad.tsv", tmp_path / "o", n=0, **FAST)
    assert main(["--tsv", str(bad), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "not an http" in capsys.readouterr().out


def test_cli_runs(tmp_path, server):
    tsv = _write_tsv(tmp_path / "val.tsv", server)
    rc = main(["--tsv", str(tsv), "--out", str(tmp_path / "cli"), "--n", "3", "--seed", "2", "--workers", "3",
               "--timeout", "0.4", "--retries", "0", "--no-progress"])
    assert rc == 0
    assert len(read_tsv(tmp_path / "cli" / "subset.tsv")) == 3
