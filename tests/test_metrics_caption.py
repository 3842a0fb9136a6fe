"""ROAD (through pytorch-grad-cam) and caption sensitivity: hand-built maps with known answers, the
library's conventions as this project states them, invariances, and both metrics through the pipeline."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from m2ib.core.metric import MetricContext
from m2ib.core.records import Attribution, Sample
from m2ib.data.generator import alternative_caption
from metrics import caption_sensitivity as cs
from metrics.road import PERCENTILES, rank_map, road, road_scores

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGET_BOX, OTHER_BOX = [2, 3, 10, 9], [18, 17, 11, 12]       # x, y, w, h in a 32 x 32 image (tiny frame = image)


OBJECTS = [{"colour": "red", "shape": "circle", "size": "small", "box": TARGET_BOX},
           {"colour": "blue", "shape": "square", "size": "large", "box": OTHER_BOX}]


def grounded_sample(i, caption="a photo of a red circle", words=("red", "circle")):
    rng = np.random.default_rng(i)
    return Sample(id=f"s{i}", image=Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")),
                  caption=caption, boxes=np.asarray([TARGET_BOX], dtype=np.float32), target_words=list(words),
                  meta={"alternative": alternative_caption(caption, list(words), ("red", "circle", "small"),
                                                           OBJECTS, False)})


def attribution(adapter, samples, maps, method="hand"):
    text = adapter.tokenize([s.caption for s in samples])
    return Attribution(method, torch.as_tensor(np.stack(maps), dtype=torch.float32), None, text.tokens,
                       text.word_mask)


def box_map(box, value=1.0, base=0.0, size=32):
    m = np.full((size, size), base)
    x, y, w, h = box
    m[y:y + h, x:x + w] = value
    return m


def fake_context(adapter, map_of, calls=None):
    """A MetricContext whose attribute() returns map_of(sample) for each sample (recording the ids)."""
    def attribute(adp, samples):
        if calls is not None:
            calls.extend(s.id for s in samples)
        return attribution(adp, samples, [map_of(s) for s in samples])
    return MetricContext(attribute=attribute)


# ---- caption sensitivity -------------------------------------------------------------------------
def test_alternative_caption_names_the_other_object_in_the_captions_style():
    alt = grounded_sample(0).meta["alternative"]
    assert alt == {"caption": "a photo of a blue square", "target_words": ["blue", "square"], "boxes": [OTHER_BOX]}
    from m2ib.data.embedded import load_embedded_split
    samples = {s.id: s for s in load_embedded_split("test", limit=12, progress=False)}
    caption = {k: s.meta["alternative"]["caption"] for k, s in samples.items() if s.meta["alternative"]}
    assert caption["test-00000"] == "a photo of a purple triangle"
    assert caption["test-00007"] == "a photo of a small purple diamond"   # plural template -> singular wording
    # another red square of the other size is in the image: the size word disambiguates
    assert caption["test-00011"] == "this shows a small red square and some other objects"
    ambiguous = OBJECTS[:1] + [dict(OBJECTS[1]) for _ in range(2)]     # the only other object appears twice
    assert alternative_caption("a red circle", ["red", "circle"], ("red", "circle", "small"), ambiguous, False) is None


def test_a_caption_blind_map_scores_zero(tiny_adapter):
    samples = [grounded_sample(i, c) for i, c in enumerate(["a photo of a red circle", "red circle", "a red circle"])]
    rng = np.random.default_rng(5)
    maps = [box_map(TARGET_BOX, 3.0) + rng.random((32, 32)) for _ in samples]
    by_image = {s.id: m for s, m in zip(samples, maps)}
    calls = []
    rows = cs.caption_sensitivity(attribution(tiny_adapter, samples, maps), tiny_adapter, samples,
                                  fake_context(tiny_adapter, lambda s: by_image[s.id.split("|")[0]], calls))
    assert sorted(calls) == sorted([f"s{i}|alt" for i in range(3)] + [f"s{i}|swap" for i in range(3)])
    assert (rows.modality == "image").all() and list(rows.sample_id) == ["s0", "s1", "s2"]
    assert (rows.named_first_true == 1).all() and (rows.named_first_alt == 0).all()
    assert (rows.named_first_both == 0).all()
    np.testing.assert_allclose(rows.box_shift, 0.0, atol=1e-12)
    np.testing.assert_allclose(rows.caption_rank_corr, 1.0, atol=1e-9)


def test_a_map_that_follows_the_caption_scores_one(tiny_adapter):
    samples = [grounded_sample(0), grounded_sample(1, "blue", ["blue"])]
    rng = np.random.default_rng(1)
    noise = {s.id: 0.1 * rng.random((32, 32)) for s in samples}

    def follow(s):     # the box the caption names lights up
        named = OTHER_BOX if s.id.endswith("|alt") or "blue" in s.caption else TARGET_BOX
        return box_map(named) + noise[s.id.split("|")[0]]
    maps = [follow(s) for s in samples]
    rows = cs.caption_sensitivity(attribution(tiny_adapter, samples, maps), tiny_adapter, samples,
                                  fake_context(tiny_adapter, follow))
    assert rows.named_first_both.iloc[0] == 1 and rows.box_shift.iloc[0] > 0.5
    assert rows.caption_rank_corr.iloc[0] < 0.9       # the swap caption names the other box (1 if blind)
    assert rows.named_first_true.iloc[1] == 0          # pair 1's own caption names the other object


@pytest.mark.parametrize("scale,offset", [(2.0, 3.0), (0.5, -7.0)])
def test_scores_ignore_constant_offsets_and_positive_scaling(tiny_adapter, scale, offset):
    samples = [grounded_sample(i, c) for i, c in enumerate(["a photo of a red circle", "look at the red circle"])]
    rng = np.random.default_rng(2)
    true = [rng.integers(0, 40, (32, 32)).astype(float) + box_map(TARGET_BOX, 8.0) for _ in samples]
    other = {f"s{i}|{kind}": rng.integers(0, 40, (32, 32)).astype(float) for i in range(2) for kind in ("alt", "swap")}
    base = cs.caption_sensitivity(attribution(tiny_adapter, samples, true), tiny_adapter, samples,
                                  fake_context(tiny_adapter, lambda s: other[s.id]))
    moved = cs.caption_sensitivity(attribution(tiny_adapter, samples, [scale * m + offset for m in true]),
                                   tiny_adapter, samples,
                                   fake_context(tiny_adapter, lambda s: 3.0 * other[s.id] - 1.0))
    assert base[list(cs.COLUMNS)].notna().all().all()
    np.testing.assert_allclose(moved[list(cs.COLUMNS)].to_numpy(float), base[list(cs.COLUMNS)].to_numpy(float),
                               rtol=0, atol=1e-12)
    flipped = cs.caption_sensitivity(attribution(tiny_adapter, samples, [-m for m in true]), tiny_adapter, samples,
                                     fake_context(tiny_adapter, lambda s: other[s.id]))
    assert (flipped.named_first_true == 0).all() and (base.named_first_true == 1).all()   # sign matters


def test_without_other_objects_only_the_swap_part_runs(tiny_adapter, caplog):
    samples = [grounded_sample(i, c) for i, c in enumerate(["red circle", "blue square"])]
    for s in samples:
        s.meta.clear()
    rng = np.random.default_rng(3)
    maps = {s.id: rng.random((32, 32)) for s in samples}
    calls = []
    with caplog.at_level(logging.WARNING):
        rows = cs.caption_sensitivity(attribution(tiny_adapter, samples, list(maps.values())), tiny_adapter,
                                      samples, fake_context(tiny_adapter, lambda s: rng.random((32, 32)), calls))
    assert "no grounded caption sensitivity" in caplog.text
    assert calls == ["s0|swap", "s1|swap"]
    assert rows[["named_first_both", "box_shift"]].isna().all().all()
    assert rows.caption_rank_corr.abs().max() < 0.2       # independent random maps


# ---- ROAD ----------------------------------------------------------------------------------------
def region_map(size=32, flip=False):
    yy, xx = np.mgrid[:size, :size]
    m = np.exp(-((yy - 8.0) ** 2 + (xx - 8.0) ** 2) / 20.0) + 1e-3 * xx + 1e-5 * yy    # no ties
    return -m if flip else m


def test_library_percentile_convention():
    """pytorch-grad-cam's MoRF at percentile p keeps the p% least relevant pixels (removes 100 - p%);
    LeRF keeps the p% most relevant. Ranked maps make the shares exact even for constant maps."""
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst
    kept = lambda img, mask: mask                       # an "imputer" returning the keep-mask
    m = torch.from_numpy(region_map())
    morf = RemoveMostRelevantFirst(80, kept)(None, m).bool()
    lerf = RemoveLeastRelevantFirst(80, kept)(None, m).bool()
    assert abs(morf.float().mean() - 0.8) < 0.01 and abs(lerf.float().mean() - 0.8) < 0.01
    assert m[~morf].min() >= m[morf].max() and m[~lerf].max() <= m[lerf].min()
    const = torch.from_numpy(rank_map(np.zeros((32, 32)), seed=0))
    assert abs(RemoveMostRelevantFirst(30, kept)(None, const).mean() - 0.3) < 0.01
    assert (RemoveMostRelevantFirst(30, kept)(None, torch.zeros(32, 32)) == 0).all()   # raw: all removed


def test_road_runs_on_the_tiny_model_and_morf_of_a_map_is_lerf_of_its_reverse(tiny_adapter):
    sample = grounded_sample(0)
    up = road(attribution(tiny_adapter, [sample], [region_map()]), tiny_adapter, [sample], MetricContext())
    down = road_scores(attribution(tiny_adapter, [sample], [region_map(flip=True)]), tiny_adapter, [sample])
    assert list(up.columns[:3]) == ["sample_id", "method", "modality"] and (up.modality == "image").all()
    r, d = up.iloc[0], down.iloc[0]
    assert np.isfinite([r.road_morf, r.road_lerf, r.road_combined]).all()
    assert r.road_morf_curve.shape == r.road_lerf_curve.shape == (len(PERCENTILES),)
    assert r.road_morf == pytest.approx(r.road_morf_curve.mean()) and r.road_morf != r.road_lerf
    assert r.road_combined == pytest.approx((r.road_lerf - r.road_morf) / 2)
    # same removal masks and the same noise per percentile: the reverse map swaps MoRF and LeRF exactly
    assert d.road_morf == pytest.approx(r.road_lerf, abs=1e-6) and d.road_lerf == pytest.approx(r.road_morf, abs=1e-6)
    assert d.road_combined == pytest.approx(-r.road_combined, abs=1e-6)
    again = road_scores(attribution(tiny_adapter, [sample], [region_map()]), tiny_adapter, [sample])
    assert again.road_morf.iloc[0] == r.road_morf          # seeded per pair: repeatable


def test_road_has_no_text_rows_and_checks_percentiles(tiny_adapter, caplog):
    from m2ib.core.errors import InputError
    sample = grounded_sample(0)
    text = tiny_adapter.tokenize([sample.caption])
    text_only = Attribution("t", None, torch.ones(1, text.ids.shape[1]), text.tokens, text.word_mask)
    with caplog.at_level(logging.WARNING):
        assert road(text_only, tiny_adapter, [sample], MetricContext()).empty
    assert "defined for images only" in caplog.text
    with pytest.raises(InputError, match="percentiles"):
        road(text_only, tiny_adapter, [sample], MetricContext(), percentiles=[0, 50])


# ---- through the pipeline -------------------------------------------------------------------------
def test_both_metrics_through_the_pipeline(tmp_path):
    from m2ib.pipeline.experiment import run_experiment
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=[
            "model=tiny", "data.limit=3", "method=[random]", "metric=[road,caption_sensitivity]"]), resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "tables"), progress=False,
               figures=False)
    out = run_experiment(cfg)
    table = out["table"]
    for col in ("road_morf", "road_lerf", "road_combined", *cs.COLUMNS):
        assert col in table.columns, col
    assert table.loc[0, "n"] == 3 and np.isfinite(table.loc[0, ["road_combined", "caption_rank_corr"]]).all()
    assert set(out["road_curves"].columns) >= {"road_morf_curve", "road_lerf_curve"}
    assert Path(out["paths"]["road_curves"]).is_file()
