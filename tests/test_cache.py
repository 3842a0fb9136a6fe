"""The attribution cache: pickle-free .npz rows that round-trip bit for bit, damaged rows reported once
and recomputed, leftover temporary files of killed writers removed."""
import io
import logging
import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.records import Attribution, Sample
from m2ib.pipeline import cache as cache_module
from m2ib.pipeline.cache import AttributionCache

LOGGER = "m2ib.pipeline.cache"


def _sample(i, caption="a red circle"):
    pixels = np.full((8, 6, 3), 40 * i, dtype=np.uint8)
    return Sample(id=f"img:{i}", image=Image.fromarray(pixels), caption=caption)


def _attribution(tokens, image=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = len(tokens), len(tokens[0])
    img = torch.randn(b, 5, 4, generator=g) if image else None
    if image:
        img[0, 0, 0], img[0, 0, 1] = -0.0, 1e-45          # sign of zero and a subnormal must survive
    text = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    return Attribution("m", img, text, tokens, mask, seconds=0.3)


def _cache(tmp_path):
    return AttributionCache(tmp_path, "m", {"model": {"m": 1}, "seed": 0})


def _bits(t):
    return t.view(torch.int32)


def _warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_round_trip_is_bit_identical_across_token_widths(tmp_path, caplog):
    cache = _cache(tmp_path)
    first = [_sample(0), _sample(1)]
    second = [_sample(2)]
    a = _attribution([["héllo", "", "猫😀"], ["a\x00", "\ud800", "|"]], seed=1)
    b = _attribution([["x", "y", "", "zz", "end"]], seed=2)
    cache.put(first, a)
    cache.put(second, b)
    assert cache.path("img:0").suffix == ".npz" and cache.missing(first + second) == []
    got = cache.get(first + second)
    assert got.image.dtype == torch.float32 and got.text.dtype == torch.float32 and got.token_mask.dtype == torch.bool
    assert torch.equal(_bits(got.image), _bits(torch.cat([a.image, b.image])))
    assert torch.equal(_bits(got.text[:2, :3]), _bits(a.text)) and torch.equal(_bits(got.text[2]), _bits(b.text[0]))
    assert torch.equal(got.text[:2, 3:], torch.zeros(2, 2))
    assert torch.equal(got.token_mask[:2, :3], a.token_mask) and not got.token_mask[:2, 3:].any()
    assert torch.equal(got.token_mask[2], b.token_mask[0])
    assert got.tokens == [a.tokens[0] + ["", ""], a.tokens[1] + ["", ""], b.tokens[0]]
    assert got.meta["seconds_per_pair"] == [0.15, 0.15, 0.3] and got.meta["cache_key"] == cache.key
    assert got.seconds == pytest.approx(0.6) and not _warnings(caplog)


def test_round_trip_without_image_map(tmp_path):
    cache = _cache(tmp_path)
    samples = [_sample(0), _sample(1)]
    a = _attribution([["a", "b"], ["c", "d"]], image=False)
    cache.put(samples, a)
    got = cache.get(samples)
    assert got.image is None and torch.equal(_bits(got.text), _bits(a.text)) and got.tokens == a.tokens


def test_rows_are_read_and_written_without_pickle(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "dump", "dumps"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    cache = _cache(tmp_path)
    samples = [_sample(0)]
    a = _attribution([["a", "b"]])
    cache.put(samples, a)
    assert torch.equal(_bits(cache.get(samples).image), _bits(a.image))


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _good_row(cache, sample):
    cache.put([sample], _attribution([["a", "b"]]))
    with np.load(cache.path(sample.id)) as z:
        return {k: z[k] for k in z.files}


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _flip_middle(data):
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]


DAMAGE = {
    "empty": lambda path, row: path.write_bytes(b""),
    "truncated": lambda path, row: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "garbage": lambda path, row: path.write_bytes(b"not a row\n" * 30),
    "corrupted": lambda path, row: path.write_bytes(_flip_middle(path.read_bytes())),
    "plain npy": lambda path, row: path.write_bytes(_npy(row["image"])),
    "old pickle": lambda path, row: path.write_bytes(pickle.dumps({"fingerprint": row["fingerprint"].item()})),
    "missing key": lambda path, row: _write_npz(path, **{k: v for k, v in row.items() if k != "tokens"}),
    "wrong dtype": lambda path, row: _write_npz(path, **{**row, "image": row["image"].astype(np.float64)}),
    "wrong shape": lambda path, row: _write_npz(path, **{**row, "text": row["text"][:1]}),
    "object array": lambda path, row: _write_npz(path, **{**row, "tokens": np.array(["a|", None], dtype=object)}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_row_is_reported_once_and_recomputed(tmp_path, caplog, damage):
    cache = _cache(tmp_path)
    sample = _sample(0)
    path = cache.path(sample.id)
    DAMAGE[damage](path, _good_row(cache, sample))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.missing([sample]) == [sample]
        with pytest.raises(RuntimeError, match="no valid cached rows"):
            cache.get([sample])
        assert cache.missing([sample]) == [sample]
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(path) in warned[0].getMessage() and "recomputed" in warned[0].getMessage()
    a = _attribution([["x", "y", "z"]], seed=3)
    cache.put([sample], a)                                    # what compute_attributions does with missing rows
    got = cache.get([sample])
    assert torch.equal(_bits(got.image), _bits(a.image)) and got.tokens == a.tokens and len(_warnings(caplog)) == 1


def test_row_of_another_caption_is_missing_without_warning(tmp_path, caplog):
    cache = _cache(tmp_path)
    cache.put([_sample(0)], _attribution([["a", "b"]]))
    other = _sample(0, caption="a blue square")               # same id, other caption
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.missing([other]) == [other] and cache.missing([_sample(0)]) == []
    assert not _warnings(caplog) and cache.path(other.id).exists()


def test_leftover_temporary_files_are_removed_on_open(tmp_path):
    folder = _cache(tmp_path).dir
    old = time.time() - cache_module._STALE_TMP_SECONDS - 60
    dead = folder / "img_0-0123456789.tmp4242"
    live = folder / "img_1-0123456789.tmp4343"                # a writer of another process, right now
    other = folder / "notes.tmpx"
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    os.utime(dead, (old, old))
    os.utime(other, (old, old))
    _cache(tmp_path)
    assert not dead.exists() and live.exists() and other.exists()
