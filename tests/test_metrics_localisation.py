"""Localisation metrics on hand-built maps whose correct values are known exactly."""
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError
from m2ib.core.records import Attribution, Sample
from m2ib.pipeline.tables import aggregate
from metrics.localisation import (average_precision, image_localisation, target_token_mask,
                                  text_localisation, threshold_region)


def wide_sample(sid, boxes):
    # 64 x 32 (w x h): resize keeps the size, the centre crop removes 16 columns on each side.
    return Sample(id=sid, image=Image.new("RGB", (64, 32), (120, 60, 30)), caption="a red square",
                  boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4))


def attr(maps, method="hand"):
    maps = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    b = maps.shape[0]
    return Attribution(method=method, image=maps, text=None, tokens=[["a"]] * b,
                       token_mask=torch.ones(b, 1, dtype=torch.bool))


def frame_mask(x, y, w, h):
    m = np.zeros((32, 32))
    m[y:y + h, x:x + w] = 1
    return m


def test_map_equal_to_box_scores_one_under_every_rule(adapter):
    # original box (20, 4, 8, 8) lands at (4, 4, 8, 8) after the crop; a second box (40, 20, 4, 6) at (24, 20).
    sample = wide_sample("s0", [[20, 4, 8, 8], [40, 20, 4, 6]])
    truth = np.maximum(frame_mask(4, 4, 8, 8), frame_mask(24, 20, 4, 6))
    for rule in ("topk", "otsu", "fraction"):
        row = image_localisation(attr(truth[None]), adapter, [sample], threshold=rule).iloc[0]
        assert row.iou == 1.0 and row.sample_id == "s0"
        assert row.pointing_game == 1.0 and row.bbox_ratio == 1.0
        assert row.box_pixels == 64 + 24 and row.region_pixels == 88


def test_box_mapping_ignores_nothing_of_the_crop(adapter):
    # A map equal to the box scaled WITHOUT the crop (the released code's mistake) is shifted by 16 px.
    sample = wide_sample("s0", [[20, 4, 8, 8]])
    wrong = frame_mask(20, 4, 8, 8)
    row = image_localisation(attr(wrong[None]), adapter, [sample]).iloc[0]
    assert row.iou == 0.0 and row.pointing_game == 0.0 and row.bbox_ratio == 0.0


def test_constant_map_gets_the_documented_chance_value(adapter):
    sample = wide_sample("c", [[20, 4, 8, 8]])
    for rule in ("topk", "otsu", "fraction"):
        row = image_localisation(attr(np.full((1, 32, 32), 0.3)), adapter, [sample], threshold=rule).iloc[0]
        assert row.iou == pytest.approx(64 / 1024) and row.region_pixels == 1024
        assert row.pointing_game == pytest.approx(64 / 1024) and row.bbox_ratio == pytest.approx(64 / 1024)


def test_partial_overlap_and_batch_rows(adapter):
    samples = [wide_sample("a", [[20, 4, 8, 8]]), wide_sample("b", [[20, 4, 8, 8]])]
    shifted = frame_mask(8, 4, 8, 8) * 0.9 + 0.05          # half of the 8x8 box overlaps (4 columns)
    rows = image_localisation(attr(np.stack([frame_mask(4, 4, 8, 8), shifted])), adapter, samples)
    assert list(rows.sample_id) == ["a", "b"]
    assert rows.iou.tolist() == [1.0, pytest.approx(32 / 96)]
    assert rows.bbox_ratio.tolist() == [1.0, 0.5]
    summary = aggregate(rows, ["method"], ["iou"])
    assert summary.loc[0, "iou"] == pytest.approx((1 + 32 / 96) / 2) and summary.loc[0, "n"] == 2


def test_fraction_and_topk_rules():
    values = np.array([[0.0, 0.2, 0.6, 1.0]])
    assert threshold_region(values, "fraction", fraction=0.5).tolist() == [[False, False, True, True]]
    assert threshold_region(values, "topk", k=1).tolist() == [[False, False, False, True]]
    ties = np.array([[0.0, 0.5, 0.5, 1.0]])
    assert threshold_region(ties, "topk", k=2).sum() == 3   # ties with the k-th value are included


def test_pointing_game_unique_maximum(adapter):
    sample = wide_sample("p", [[20, 4, 8, 8]])
    m = np.zeros((1, 32, 32))
    m[0, 5, 5] = 1.0                 # inside (4..12, 4..12)
    assert image_localisation(attr(m), adapter, [sample]).iloc[0].pointing_game == 1.0
    m[0, 5, 5], m[0, 20, 20] = 0.5, 1.0
    assert image_localisation(attr(m), adapter, [sample]).iloc[0].pointing_game == 0.0


def test_bad_inputs_name_the_sample(adapter):
    good = wide_sample("good", [[20, 4, 8, 8]])
    with pytest.raises(InputError, match="empty"):
        image_localisation(attr(np.ones((2, 32, 32))), adapter, [good, wide_sample("nobox", [])])
    with pytest.raises(InputError, match="nobox"):
        image_localisation(attr(np.ones((2, 32, 32))), adapter, [good, wide_sample("nobox", [])])
    with pytest.raises(InputError, match="good"):
        image_localisation(attr(np.ones((1, 16, 16))), adapter, [good])
    nan = attr(np.ones((2, 32, 32)))
    nan.image[1, 3, 3] = float("nan")
    with pytest.raises(InputError, match="'second'.*NaN"):
        image_localisation(nan, adapter, [good, wide_sample("second", [[20, 4, 8, 8]])])
    with pytest.raises(InputError, match="cropped away"):
        image_localisation(attr(np.ones((1, 32, 32))), adapter, [wide_sample("edge", [[0, 0, 10, 10]])])
    with pytest.raises(InputError, match="rows"):
        image_localisation(attr(np.ones((2, 32, 32))), adapter, [good])


# ---- text -----------------------------------------------------------------------------------------
def text_attr(tokens, scores):
    t = len(tokens)
    mask = torch.tensor([[0 < j < t - 1 for j in range(t)]])
    return Attribution(method="hand", image=None, text=torch.tensor([scores], dtype=torch.float32),
                       tokens=[tokens], token_mask=mask)


def test_token_matching_joins_word_pieces():
    tokens = ["<start_of_text>", "a", "left", "-", "sided", "ple", "ural", "ef", "fusion", "<end_of_text>"]
    mask = np.array([0 < j < 9 for j in range(10)])
    hit = target_token_mask(tokens, mask, ["Left-sided", "pleural effusion"], "x")
    assert hit.tolist() == [False, False, True, True, True, True, True, True, True, False]
    with pytest.raises(InputError, match="'x'.*'cardiomegaly'"):
        target_token_mask(tokens, mask, ["cardiomegaly"], "x")


def test_text_ratio_and_ap_exact():
    tokens = ["<start_of_text>", "a", "red", "square", "left", "<end_of_text>"]
    sample = Sample(id="t0", image=Image.new("RGB", (8, 8)), caption="a red square left", target_words=["red"])
    rows = text_localisation(text_attr(tokens, [0, 0.1, 0.9, 0.2, 0.3, 0]), [sample])
    assert rows.iloc[0].text_ratio == 1.0 and rows.iloc[0].text_ap == 1.0
    rows = text_localisation(text_attr(tokens, [0, 0.1, 0.2, 0.9, 0.3, 0]), [sample])
    assert rows.iloc[0].text_ratio == 0.0 and rows.iloc[0].text_ap == pytest.approx(1 / 3)   # red ranked 3rd
    rows = text_localisation(text_attr(tokens, [0, 0.5, 0.5, 0.5, 0.5, 0]), [sample])
    assert rows.iloc[0].text_ratio == 0.25 and rows.iloc[0].text_ap == 0.25          # constant: chance level
    with pytest.raises(InputError, match="t1"):
        text_localisation(text_attr(tokens, [0, 0.1, 0.2, 0.9, 0.3, 0]),
                          [Sample(id="t1", image=sample.image, caption="x", target_words=None)])


def test_average_precision_matches_hand_computation():
    # ranks: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2
    assert average_precision(np.array([4.0, 3, 2, 1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
