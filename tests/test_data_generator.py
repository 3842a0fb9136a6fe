"""The seeded shape generator: determinism, valid boxes, honest ground truth, real-format round trip."""
import numpy as np
import pytest

from m2ib.data import embedded
from m2ib.data.cc import load_cc
from m2ib.data.generator import (COLOURS, IMAGE_SIZE, PLURALS, SIZE_WORDS, _safe_region, generate_pair,
                                 generate_split, pixel_sha256)
from m2ib.data.mscxr import load_mscxr
from m2ib.core.errors import InputError

SEED = 7


@pytest.fixture(scope="module")
def pairs():
    return list(generate_split("test", 150, SEED))


def test_same_seed_same_pair_and_index_independent():
    a, b = generate_pair(SEED, "train", 3), generate_pair(SEED, "train", 3)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and np.array_equal(a.boxes, b.boxes)
    # pair 3 does not depend on how many pairs were generated before it
    c = list(generate_split("train", 2, SEED, start=2))[1]
    assert pixel_sha256(c.image) == pixel_sha256(a.image)
    # other seed / split / index give other images
    for other in (generate_pair(SEED + 1, "train", 3), generate_pair(SEED, "val", 3), generate_pair(SEED, "train", 4)):
        assert not np.array_equal(other.image, a.image)


def test_unknown_split_is_rejected():
    with pytest.raises(InputError, match="unknown split"):
        generate_pair(SEED, "dev", 0)


def test_boxes_inside_the_visible_image_and_tight(pairs):
    w, h = IMAGE_SIZE
    x0, y0, x1, y1 = _safe_region()
    for p in pairs:
        assert p.image.shape == (h, w, 3) and p.image.dtype == np.uint8
        assert 1 <= len(p.boxes) <= 2
        for x, y, bw, bh in p.boxes:
            assert x0 <= x and y0 <= y and x + bw <= x1 and y + bh <= y1
            # the box is tight: its border rows/columns hold target-coloured pixels
            crop = p.image[int(y):int(y + bh), int(x):int(x + bw)].astype(int)
            colour = np.array(COLOURS[p.target[0]])
            near = np.abs(crop - colour).max(-1) <= 16
            assert near[0].any() and near[-1].any() and near[:, 0].any() and near[:, -1].any()
        # objects do not overlap
        bs = [o.box for o in p.objects]
        for i in range(len(bs)):
            for j in range(i + 1, len(bs)):
                a, b = bs[i], bs[j]
                assert a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]


def test_text_ground_truth_names_the_target(pairs):
    for p in pairs:
        words = p.caption.split()
        assert all(w in words for w in p.target_words)
        colour, shape, size = p.target
        assert colour in p.target_words
        assert (PLURALS[shape] if len(p.boxes) == 2 else shape) in p.target_words
        size_words = [w for w in p.target_words if w in SIZE_WORDS[size]]
        # distractors never equal the target; size is named whenever it is needed to disambiguate
        assert all(o.attributes() != p.target for o in p.objects[len(p.boxes):])
        if any(o.colour == colour and o.shape == shape and o.size != size for o in p.objects):
            assert size_words, p.caption
    # wording varies
    assert len({p.caption.replace(" ".join(p.target_words), "X") for p in pairs}) >= 8


def test_target_is_not_the_odd_one_out(pairs):
    """The target is drawn independently of the distractors: it often shares colour or shape with one."""
    shares_colour = np.mean([any(o.colour == p.target[0] for o in p.objects[len(p.boxes):]) for p in pairs])
    shares_shape = np.mean([any(o.shape == p.target[1] for o in p.objects[len(p.boxes):]) for p in pairs])
    assert shares_colour > 0.2 and shares_shape > 0.2
    assert len({p.target for p in pairs}) > 30


def test_written_split_round_trips_through_both_real_loaders(tmp_path):
    folder = embedded.write_split("val", tmp_path, n=12, seed=SEED, progress=False)
    gen = list(generate_split("val", 12, SEED))
    ms = load_mscxr(folder / "val.csv", folder, progress=False)
    cc = load_cc(folder / "val.tsv", folder, text_gt=folder / "val.text_gt.csv", progress=False)
    assert len(ms) == len(cc) == 12
    for g, m, c in zip(gen, ms, cc):
        assert m.id == g.id and m.caption == c.caption == g.caption
        assert np.array_equal(m.boxes, g.boxes)
        assert m.target_words == c.target_words == g.target_words
        assert np.array_equal(np.asarray(m.image.convert("RGB")), g.image)
        assert np.array_equal(np.asarray(c.image.convert("RGB")), g.image)
        assert m.category == g.target[1]
    # several rows per pair when the target appears twice
    rows = (folder / "val.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == sum(len(g.boxes) for g in gen)
    # the digest is a function of the content only
    assert embedded.digest_split("val", folder) == embedded.digest_split(
        "val", embedded.write_split("val", tmp_path / "again", n=12, seed=SEED, progress=False))
