"""Degradation (IBA) and deletion/insertion (RISE) curves: exact values on hand-built maps, a linear mock model
whose similarity lives in one tile (or one word), the tiny random model, and a pipeline run."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from scipy.ndimage import gaussian_filter

from m2ib.core.errors import InputError
from m2ib.core.metric import METRICS, MetricContext
from m2ib.core.records import Attribution, Sample, TextBatch
from metrics.curves_common import (gaussian_blur, normalise_curve, ranking, removal_counts, resolve_blur_sigma,
                                   trapezoid_auc)
from metrics.degradation import degradation_scores, tile_labels, tile_means
from metrics.deletion import deletion_scores

CONF = Path(__file__).resolve().parents[1] / "conf"


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(1)
    caps = ["a red square on the left", "a blue circle", "green triangle near a yellow star"]
    return [Sample(id=f"p{i}", image=Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), caption=c)
            for i, c in enumerate(caps)]


def make_attr(adapter, samples, image=None, text=None, method="hand"):
    batch = adapter.tokenize([s.caption for s in samples])
    return Attribution(method=method, image=None if image is None else torch.as_tensor(image, dtype=torch.float32),
                       text=None if text is None else torch.as_tensor(text, dtype=torch.float32),
                       tokens=batch.tokens, token_mask=batch.word_mask.cpu())


def sim(adapter, pixels, text):
    with torch.no_grad():
        return adapter.similarity(pixels, text).double().numpy()


class LinearMock:
    """An 8 x 8 'model' whose similarity is (weight . red channel) x (1 if the first word is kept else 0.25):
    with weight on the top-left 4 x 4 tile only, that tile (or the first word) carries all of it."""

    image_size, grid_size, blank_token_id, device = (8, 8), (2, 2), 0, torch.device("cpu")

    def __init__(self, weight):
        self.weight = torch.as_tensor(weight, dtype=torch.float32)

    def preprocess(self, images):
        return torch.stack([torch.tensor(np.array(im), dtype=torch.float32).permute(2, 0, 1) / 255
                            for im in images])

    def tokenize(self, captions):
        T = 8
        ids, tokens = torch.zeros(len(captions), T, dtype=torch.long), []
        mask = torch.zeros(len(captions), T, dtype=torch.bool)
        for i, c in enumerate(captions):
            words = c.split()
            ids[i, :len(words) + 2] = torch.tensor([900] + [10 + j for j in range(len(words))] + [901])
            mask[i, 1:len(words) + 1] = True
            tokens.append(["<sot>"] + words + ["<eot>"] + [""] * (T - len(words) - 2))
        eot = mask.sum(1) + 1
        return TextBatch(ids, eot, tokens, mask, [False] * len(captions), list(captions))

    def similarity(self, pixels, text):
        image = (pixels[:, 0] * self.weight).sum((1, 2))
        return image * torch.where(text.ids[:, 1] != self.blank_token_id, 1.0, 0.25)


def tile0_weight():
    w = np.zeros((8, 8))
    w[:4, :4] = 1.0 / 16
    return w


def mock_samples(red):
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[..., 0] = red
    return [Sample(id="m0", image=Image.fromarray(img), caption="dog runs on grass")]


# ---- helpers ------------------------------------------------------------------------------------------
def test_trapezoid_auc_of_known_curves():
    assert trapezoid_auc([0.0, 1.0, 1.0], [0.0, 0.5, 1.0]) == pytest.approx(0.75)
    assert trapezoid_auc([1.0, 0.0]) == pytest.approx(0.5)
    assert trapezoid_auc(np.linspace(0, 1, 11) ** 2, np.linspace(0, 1, 11)) == pytest.approx(0.335)
    assert np.isnan(trapezoid_auc([1.0, np.nan, 0.0]))
    with pytest.raises(InputError):
        trapezoid_auc([1.0])


def test_steps_ties_and_normalisation_rules():
    assert removal_counts(16, 20).tolist() == list(range(17))          # one unit per step when fewer units
    assert removal_counts(10, 4).tolist() == [0, 3, 5, 8, 10]           # round half up
    assert removal_counts(1024, 4).tolist() == [0, 256, 512, 768, 1024]
    values = np.array([1.0, 0.0, 1.0, 0.0])
    assert ranking(values).tolist() == [0, 2, 1, 3] and ranking(values, descending=False).tolist() == [1, 3, 0, 2]
    assert ranking(np.ones(5)).tolist() == ranking(np.ones(5), descending=False).tolist() == [0, 1, 2, 3, 4]
    assert normalise_curve(np.array([0.8, 0.5, 0.2]), 0.8, 0.2).tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert np.isnan(normalise_curve(np.array([0.3, 0.3]), 0.3, 0.3 + 1e-9)).all()
    # a gap below min_gap (default 0.05) or a negative one: the ratio would explode, so NaN
    assert np.isnan(normalise_curve(np.array([0.34, 0.3]), 0.34, 0.3)).all()
    assert normalise_curve(np.array([0.34, 0.3]), 0.34, 0.3, min_gap=0.01).tolist() == pytest.approx([1.0, 0.0])
    assert np.isnan(normalise_curve(np.array([0.2, 0.3]), 0.2, 0.3)).all()           # removal raised s
    assert normalise_curve(np.array([0.2, 0.3]), 0.2, 0.3, min_gap=0.0).tolist() == pytest.approx([1.0, 0.0])


def test_tiles_and_blur():
    labels = tile_labels((5, 5), 2)                                     # 3 x 3 tiles, smaller at the edges
    assert labels[0].tolist() == [0, 0, 1, 1, 2] and labels[4].tolist() == [6, 6, 7, 7, 8]
    values = np.arange(25, dtype=float).reshape(5, 5)
    assert tile_means(values, labels)[[0, 8]].tolist() == [3.0, 24.0]
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.7, 1.5):
        ref = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
        np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), ref, atol=1e-12)
    assert torch.equal(gaussian_blur(x, 0.0), x)


# ---- exact values on the linear mock ------------------------------------------------------------------
def test_perfect_map_degradation_is_known_exactly():
    adapter, samples = LinearMock(tile0_weight()), mock_samples(255)
    perfect = np.repeat(np.repeat(np.array([[4.0, 3.0], [2.0, 1.0]]), 4, 0), 4, 1)[None]   # tile 0 first
    row = degradation_scores(make_attr(adapter, samples, image=perfect), adapter, samples, tile=4).iloc[0]
    # MoRF [1, 0, 0, 0, 0] (area 1/8), LeRF [1, 1, 1, 1, 0] (area 7/8) over 0, 1/4, .., 1 (4 tiles < 20 steps)
    assert row.morf_auc == pytest.approx(0.125) and row.lerf_auc == pytest.approx(0.875)
    assert row.degradation == pytest.approx(0.75)
    assert len(row.morf) == 21 and row.morf[0] == 1.0 and row.morf[-1] == 0.0 and row.morf[1] == pytest.approx(0.8)
    worst = degradation_scores(make_attr(adapter, samples, image=-perfect), adapter, samples, tile=4).iloc[0]
    assert worst.degradation == pytest.approx(-0.75)
    # the default tile is one patch (8 // 2 = 4 px): the same four tiles
    assert degradation_scores(make_attr(adapter, samples, image=perfect), adapter, samples).iloc[0].degradation \
        == pytest.approx(0.75)


def test_perfect_map_deletion_and_insertion_are_known_exactly():
    adapter = LinearMock(tile0_weight())
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:4, :4] = 255                                                   # red tile 0 on black: s(full) = 1
    samples = mock_samples(img)
    row = deletion_scores(make_attr(adapter, samples, image=tile0_weight()[None]), adapter, samples, steps=4,
                          blur_sigma=1.0).iloc[0]
    assert row.deletion.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0])
    assert row.deletion_auc == pytest.approx(0.125) and row.deletion_auc_norm == pytest.approx(0.125)
    red = np.zeros((1, 1, 8, 8))
    red[..., :4, :4] = 1.0
    blurred = gaussian_filter(red, (0, 0, 1.0, 1.0), mode="nearest", truncate=3.0)[0, 0]
    s_canvas = float((blurred * tile0_weight()).sum())
    assert 0.3 < s_canvas < 0.9
    assert row.insertion.tolist() == pytest.approx([s_canvas, 1.0, 1.0, 1.0, 1.0])
    assert row.insertion_auc == pytest.approx(0.25 * (s_canvas + 1) / 2 + 0.75)
    assert row.insertion_auc_norm == pytest.approx(0.875)


def test_perfect_token_scores_are_known_exactly():
    adapter, samples = LinearMock(tile0_weight()), mock_samples(255)
    scores = np.zeros((1, 8))
    scores[0, 1:5] = [4.0, 3.0, 2.0, 1.0]                               # the first word, which carries s, first
    attr = make_attr(adapter, samples, text=scores)
    deg = degradation_scores(attr, adapter, samples, modality="text").iloc[0]
    assert deg.degradation == pytest.approx(0.75)
    rows = deletion_scores(attr, adapter, samples, modality="text").iloc[0]
    assert rows.deletion_auc == pytest.approx(0.25 * 0.625 + 0.75 * 0.25)      # [1, .25, .25, .25, .25]
    assert rows.insertion_auc == pytest.approx(0.25 * 0.625 + 0.75)            # [.25, 1, 1, 1, 1]
    assert len(rows.deletion) == 21 and rows.deletion[0] == 1.0 and rows.insertion[0] == 0.25


def test_no_measurable_change_gives_nan_not_a_number():
    adapter, samples = LinearMock(np.zeros((8, 8))), mock_samples(255)  # s = 0 whatever is removed
    attr = make_attr(adapter, samples, image=np.random.default_rng(0).random((1, 8, 8)))
    row = degradation_scores(attr, adapter, samples).iloc[0]
    assert np.isnan(row.degradation) and np.isnan(row.morf).all()
    row = deletion_scores(attr, adapter, samples).iloc[0]
    assert row.deletion_auc == 0.0 and np.isnan(row.deletion_auc_norm) and np.isnan(row.insertion_auc_norm)


# ---- the tiny random model ----------------------------------------------------------------------------
#: The random tiny model's similarity barely moves when inputs are removed (gaps of ~1e-3), below the
#: default MIN_GAP (0.05, chosen on the trained embedded model); these tests check mechanics, so they lower it.
TINY = {"min_gap": 0.0}

def test_constant_map_scores_exactly_zero_and_reversed_map_negates(tiny_adapter, samples):
    a = tiny_adapter
    const = make_attr(a, samples, image=np.ones((3, 32, 32)), text=np.ones((3, 77)))
    for modality in ("image", "text"):
        rows = degradation_scores(const, a, samples, modality=modality, batch_size=5, **TINY)
        assert (rows.degradation == 0.0).all(), modality
        assert all(np.array_equal(m, l) for m, l in zip(rows.morf, rows.lerf))
    rng = np.random.default_rng(2)
    image, text = rng.random((3, 32, 32)), rng.random((3, 77))
    for modality in ("image", "text"):
        one = degradation_scores(make_attr(a, samples, image=image, text=text), a, samples, modality=modality, **TINY)
        other = degradation_scores(make_attr(a, samples, image=-image, text=-text), a, samples, modality=modality,
                                   batch_size=7, **TINY)
        assert (one.degradation.abs() > 1e-3).all(), modality
        np.testing.assert_allclose(other.degradation, -one.degradation, atol=1e-5)
        np.testing.assert_allclose(np.stack(other.morf), np.stack(one.lerf), atol=1e-5)


def test_deletion_and_insertion_curves_hit_their_endpoints(tiny_adapter, samples):
    a = tiny_adapter
    ramp = -np.tile(np.arange(32.0), (3, 32, 1))                       # left columns first
    rows = deletion_scores(make_attr(a, samples, image=ramp), a, samples, steps=4, batch_size=3, **TINY)
    pixels, text = a.preprocess([s.image for s in samples]), a.tokenize([s.caption for s in samples])
    left_gone = pixels.clone()
    left_gone[..., :16] = 0.0
    canvas = torch.as_tensor(gaussian_filter(pixels.numpy(), (0, 0, 5 * 32 / 224, 5 * 32 / 224), mode="nearest",
                                             truncate=3.0))
    dele, ins = np.stack(rows.deletion), np.stack(rows.insertion)
    np.testing.assert_allclose(dele[:, 0], sim(a, pixels, text), atol=1e-6)
    np.testing.assert_allclose(dele[:, 2], sim(a, left_gone, text), atol=1e-5)        # half the pixels: left half
    np.testing.assert_allclose(dele[:, -1], sim(a, torch.zeros_like(pixels), text), atol=1e-5)
    np.testing.assert_allclose(ins[:, 0], sim(a, canvas, text), atol=1e-5)
    np.testing.assert_allclose(ins[:, -1], sim(a, pixels, text), atol=1e-6)
    x = np.linspace(0, 1, 5)
    np.testing.assert_allclose(rows.deletion_auc, [trapezoid_auc(d, x) for d in dele], atol=1e-12)
    assert resolve_blur_sigma(a, None) == pytest.approx(5 * 32 / 224)


def test_text_curves_start_and_end_at_the_right_values(tiny_adapter, samples):
    a = tiny_adapter
    text = a.tokenize([s.caption for s in samples])
    scores = torch.rand(text.ids.shape, generator=torch.Generator().manual_seed(3)) * text.word_mask
    attr = make_attr(a, samples, text=scores)
    pixels = a.preprocess([s.image for s in samples])
    full, blank = sim(a, pixels, text), sim(a, pixels, text.with_blanks(text.word_mask, a.blank_token_id))
    rows = deletion_scores(attr, a, samples, modality="text", **TINY)
    dele, ins = np.stack(rows.deletion), np.stack(rows.insertion)
    np.testing.assert_allclose(dele[:, 0], full, atol=1e-6)
    np.testing.assert_allclose(dele[:, -1], blank, atol=1e-5)
    np.testing.assert_allclose(ins[:, 0], blank, atol=1e-5)
    np.testing.assert_allclose(ins[:, -1], full, atol=1e-6)
    # pair 1 ("a blue circle": 3 words, one per step): its words blanked one by one in decreasing score order
    positions = text.word_mask[1].nonzero().flatten()
    order = positions[torch.argsort(-scores[1, positions], stable=True)]
    curve = []
    for c in range(len(positions) + 1):
        drop = torch.zeros(1, text.ids.shape[1], dtype=torch.bool)
        drop[0, order[:c]] = True
        curve.append(sim(a, pixels[[1]], text.select([1]).with_blanks(drop, a.blank_token_id))[0])
    assert len(curve) == 4 and rows.deletion_auc[1] == pytest.approx(trapezoid_auc(curve), abs=1e-6)
    deg = degradation_scores(attr, a, samples, modality="text", **TINY)
    assert all(m[0] == 1.0 and m[-1] == 0.0 for m in deg.morf)


def test_batch_size_and_modalities(tiny_adapter, samples, caplog):
    a = tiny_adapter
    maps = np.random.default_rng(4).random((3, 32, 32))
    attr = make_attr(a, samples, image=maps)
    one = degradation_scores(attr, a, samples, batch_size=1, baseline="blur", **TINY)
    many = degradation_scores(attr, a, samples, batch_size=64, baseline="blur", **TINY)
    np.testing.assert_allclose(one.degradation, many.degradation, atol=1e-5)
    mean = degradation_scores(attr, a, samples, batch_size=64, **TINY)
    assert not np.allclose(mean.degradation, many.degradation)            # the baseline matters
    with caplog.at_level(logging.WARNING):
        for name in ("degradation", "deletion"):
            rows = METRICS.get(name).score(attr, a, samples, MetricContext())
            assert rows.modality.tolist() == ["image"] * 3, name
    assert "explains no text" in caplog.text
    with pytest.raises(InputError, match="baseline"):
        degradation_scores(attr, a, samples, baseline="noise", **TINY)
    with pytest.raises(InputError, match="tile"):
        degradation_scores(attr, a, samples, tile=0, **TINY)
    with pytest.raises(InputError, match="modalities"):
        METRICS.get("deletion").score(attr, a, samples, MetricContext(), modalities=["audio"])
    with pytest.raises(InputError, match="steps"):
        deletion_scores(attr, a, samples, steps=0, **TINY)
    with pytest.raises(InputError, match="parameter steps"):
        METRICS.get("deletion").check_params({"steps": 2.5})


# ---- the pipeline -------------------------------------------------------------------------------------
def test_both_metrics_run_through_the_pipeline(tmp_path):
    from m2ib.pipeline.experiment import run_experiment
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=[
            "model=tiny", "data.limit=3", "method=[random,saliency]", "metric=[degradation,deletion]",
            "metric.degradation.steps=8", "metric.deletion.steps=8", "metric.degradation.min_gap=0.0",
            "metric.deletion.min_gap=0.0"]), resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "tables"), progress=False, figures=False)
    result = run_experiment(cfg)
    paths = result["paths"]
    for metric, curves in (("degradation", {"morf", "lerf"}), ("deletion", {"deletion", "insertion"})):
        assert Path(paths[f"{metric}_curves_png"]).is_file()
        summary = pd.read_csv(paths[f"{metric}_curves"])
        assert set(summary.curve) == curves and set(summary.modality) == {"image", "text"}
        assert set(summary.method) == {"random", "saliency"} and summary.step.max() == 8
        assert (summary.n == 3).all()
    table = result["table"]
    assert len(table) == 4
    for col in ("degradation", "deletion_auc", "insertion_auc", "deletion_auc_norm", "insertion_auc_norm"):
        assert table[col].notna().all() and f"{col}_ci_low" in table.columns, col
    rows = pd.read_csv(paths["rows"])
    assert len(rows) == 12 and not {"morf", "lerf", "deletion", "insertion"} & set(rows.columns)
    assert table["deletion_auc"].between(-1, 1).all()
