"""Real-format loaders: MS-CXR CSV grouping and errors, Conceptual Captions TSV + download manifest,
and box mapping through the model's resize + centre crop."""
import csv
import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image

from m2ib.data.cc import load_cc
from m2ib.data.generator import COLOURS, generate_pair
from m2ib.data.mscxr import REQUIRED_COLUMNS, load_mscxr
from m2ib.core.errors import DataUnavailableError, InputError


def _image(root, rel, size=(60, 40), colour=(10, 20, 30)):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return rel


def _csv(path, rows, header=REQUIRED_COLUMNS):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def mscxr(tmp_path):
    _image(tmp_path, "files/p1/a.jpg")
    _image(tmp_path, "files/p1/b.jpg", size=(50, 50))
    rows = [
        ["a", "Pneumonia", "left lower opacity", "files/p1/a.jpg", 1, 2, 10, 5, 60, 40],
        ["a", "Pneumonia", "left lower opacity", "files/p1/a.jpg", 30, 20, 20, 10, 60, 40],
        ["a", "Cardiomegaly", "enlarged heart", "files/p1/a.jpg", 5, 5, 20, 20, 60, 40],
        ["b", "Edema", "edema", "files/p1/b.jpg", 0, 0, 50, 50, 50, 50],
    ]
    return tmp_path, rows


def test_rows_of_one_pair_become_one_sample_with_all_boxes(mscxr):
    root, rows = mscxr
    samples = load_mscxr(_csv(root / "ms.csv", rows), root, progress=False)
    assert [s.id for s in samples] == ["a#0", "a#1", "b"]
    assert samples[0].boxes.tolist() == [[1, 2, 10, 5], [30, 20, 20, 10]]
    assert samples[0].caption == "left lower opacity" and samples[0].category == "Pneumonia"
    assert samples[1].boxes.shape == (1, 4) and samples[0].target_words is None
    assert samples[2].image.size == (50, 50)
    assert len(load_mscxr(root / "ms.csv", root, limit=1, progress=False)) == 1


def test_max_side_scales_boxes_with_the_image(mscxr):
    root, rows = mscxr
    s = load_mscxr(_csv(root / "ms.csv", rows), root, max_side=30, progress=False)[0]
    assert s.image.size == (30, 20)
    assert np.allclose(s.boxes, np.array([[1, 2, 10, 5], [30, 20, 20, 10]]) * 0.5)


def test_missing_csv_and_image_name_the_file(mscxr):
    root, rows = mscxr
    with pytest.raises(DataUnavailableError, match="nope.csv"):
        load_mscxr(root / "nope.csv", root)
    rows[3][3] = "files/p1/missing.jpg"
    with pytest.raises(DataUnavailableError, match=r"ms.csv row 4 .*missing.jpg"):
        load_mscxr(_csv(root / "ms.csv", rows), root, progress=False)


@pytest.mark.parametrize("col,value,message", [
    (4, "abc", r"row 2 .*'x' is not a number"),
    (6, "-3", r"row 2 .*non-positive size"),
    (4, "55", r"row 2 .*outside the image"),
    (2, "", r"row 2 .*'label_text' is empty"),
])
def test_malformed_rows_name_file_and_row(mscxr, col, value, message):
    root, rows = mscxr
    rows[1][col] = value
    with pytest.raises(InputError, match=message):
        load_mscxr(_csv(root / "ms.csv", rows), root, progress=False)


def test_short_row_missing_column_and_wrong_image_size(mscxr):
    root, rows = mscxr
    rows[2] = rows[2][:6]
    with pytest.raises(InputError, match=r"ms.csv row 3"):
        load_mscxr(_csv(root / "ms.csv", rows), root, progress=False)
    with pytest.raises(InputError, match=r"missing column\(s\) \['image_height'\]"):
        load_mscxr(_csv(root / "h.csv", [r[:-1] for r in mscxr[1][:1]], REQUIRED_COLUMNS[:-1]), root)
    _, rows = mscxr
    bad = [r[:] for r in rows[:1]]
    bad[0][8] = 61
    with pytest.raises(InputError, match=r"row 1 .*60x40 pixels but the CSV says 61x40"):
        load_mscxr(_csv(root / "s.csv", bad), root, progress=False)


def test_box_within_tolerance_is_clipped(mscxr):
    root, rows = mscxr
    rows[3][6:8] = [50.5, 50]
    s = load_mscxr(_csv(root / "ms.csv", rows), root, progress=False)[2]
    assert s.boxes.tolist() == [[0, 0, 50, 50]]


def test_cc_tsv_local_paths_urls_and_manifest(tmp_path):
    for name, c in (("a.png", (255, 0, 0)), ("dl/b.png", (0, 255, 0))):
        _image(tmp_path, name, colour=c)
    sha_b = hashlib.sha256((tmp_path / "dl/b.png").read_bytes()).hexdigest()
    (tmp_path / "cc.tsv").write_text("a red thing\ta.png\n"
                                     "a green thing\thttp://x.org/b.jpg\n"
                                     "a dead link\thttp://x.org/c.jpg\n"
                                     "never downloaded\thttp://x.org/d.jpg\n")
    _csv(tmp_path / "manifest.csv", [["http://x.org/b.jpg", "dl/b.png", sha_b, "ok"],
                                     ["http://x.org/c.jpg", "", "", "dead"]], ("url", "path", "sha256", "status"))
    with pytest.warns(UserWarning, match=r"skipped 2 row\(s\).*dead: 1.*not in manifest: 1"):
        samples = load_cc(tmp_path / "cc.tsv", tmp_path, manifest=tmp_path / "manifest.csv", verify_sha256=True)
    assert [s.caption for s in samples] == ["a red thing", "a green thing"]
    assert [s.id for s in samples] == ["cc:1", "cc:2"]
    assert samples[1].image.getpixel((0, 0)) == (0, 255, 0) and samples[0].boxes.shape == (0, 4)
    with pytest.raises(DataUnavailableError, match=r"cc.tsv line 2: entry is a URL"):
        load_cc(tmp_path / "cc.tsv", tmp_path)
    # a manifest hash that does not match the file
    _csv(tmp_path / "m2.csv", [["http://x.org/b.jpg", "dl/b.png", "0" * 64, "ok"]], ("url", "path", "sha256", "status"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match=r"line 2: image .*b.png does not match its manifest sha256"):
            load_cc(tmp_path / "cc.tsv", tmp_path, manifest=tmp_path / "m2.csv", verify_sha256=True)


def test_cc_bad_lines_name_file_and_line(tmp_path):
    _image(tmp_path, "a.png")
    (tmp_path / "x.tsv").write_text("ok caption\ta.png\ncaption only\n")
    with pytest.raises(InputError, match=r"x.tsv line 2: expected 'caption<TAB>path-or-url'"):
        load_cc(tmp_path / "x.tsv", tmp_path)
    (tmp_path / "y.tsv").write_text("ok caption\ta.png\nmissing\tgone.png\n")
    with pytest.raises(DataUnavailableError, match=r"y.tsv line 2: image file .*gone.png"):
        load_cc(tmp_path / "y.tsv", tmp_path)
    with pytest.raises(DataUnavailableError, match="absent.tsv"):
        load_cc(tmp_path / "absent.tsv", tmp_path)


def test_boxes_map_through_the_models_resize_and_centre_crop():
    """The mapped box lands on the target's pixels in the preprocessed image (like with like)."""
    from m2ib.models.sources import load_adapter
    adapter = load_adapter("m2ib-tiny-vit")
    mean = torch_tensor(adapter, "mean")
    std = torch_tensor(adapter, "std")
    checked = 0
    for i in range(12):
        p = generate_pair(3, "test", i)
        if p.target[2] != "large":
            continue
        img = Image.fromarray(p.image)
        x = adapter.preprocess([img])[0].cpu().numpy() * std + mean          # (3, H, W) in [0, 1]
        (bx, by, bw, bh), = adapter.box_to_input_frame(p.boxes[:1], img.size)
        assert bw > 0 and bh > 0
        cx, cy = int(bx + bw / 2), int(by + bh / 2)
        got = x[:, cy, cx] * 255
        assert np.abs(got - np.array(COLOURS[p.target[0]])).max() < 40, (p.caption, got)
        checked += 1
    assert checked >= 3


def torch_tensor(adapter, which):
    t = [t for t in adapter._preprocess.transforms if hasattr(t, which)][0]
    return np.array(getattr(t, which)).reshape(3, 1, 1)
