"""Cascading randomisation on the tiny random model: exact values for weight-independent maps,
real change for a gradient map, and the cascade really randomises cumulatively from the top."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError
from m2ib.core.records import Attribution, Sample
from metrics.sanity import (cascading_randomisation, plot_sanity_curve, randomise_parameters, sanity_table,
                            spearman, ssim)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(1)
    caps = ["a red square", "a blue circle on the right", "two green stars"]
    return [Sample(id=f"s{i}", image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), caption=c)
            for i, c in enumerate(caps)]


def edge_detector(adapter, samples):
    """A map that ignores the model: pixel brightness and token position."""
    pixels = adapter.preprocess([s.image for s in samples])
    text = adapter.tokenize([s.caption for s in samples])
    pos = torch.arange(text.ids.shape[1], dtype=torch.float32)[None] * text.word_mask.float()
    return Attribution("edge", pixels.mean(1).cpu(), pos.cpu(), text.tokens, text.word_mask.cpu())


def gradient(adapter, samples):
    """|d similarity / d input| through the adapter interface only."""
    pixels = adapter.preprocess([s.image for s in samples]).requires_grad_(True)
    text = adapter.tokenize([s.caption for s in samples])
    emb = adapter.embed_tokens(text).detach().requires_grad_(True)
    sim = (adapter.encode_image(pixels) * adapter.encode_text_from_embeddings(emb, text)).sum()
    gp, ge = torch.autograd.grad(sim, [pixels, emb])
    return Attribution("grad", gp.abs().sum(1).detach().cpu(), (ge.norm(dim=-1) * text.word_mask).detach().cpu(),
                       text.tokens, text.word_mask.cpu())


def test_model_independent_map_scores_one_everywhere(adapter, samples):
    rows = cascading_randomisation(adapter, samples, edge_detector, progress=False)
    n_steps = len(adapter.randomization_order("image")) + len(adapter.randomization_order("text"))
    assert len(rows) == n_steps * len(samples) * 2          # both maps compared at every step
    assert (rows.spearman == 1.0).all()
    assert (rows[rows.map_modality == "image"].ssim == 1.0).all() and rows[rows.map_modality == "text"].ssim.isna().all()


def test_gradient_map_changes_and_run_is_repeatable(adapter, samples, tmp_path):
    before = [p.detach().clone() for p in adapter.parameters()]
    rows = cascading_randomisation(adapter, samples, gradient, encoders=("image",), seed=3, progress=False)
    again = cascading_randomisation(adapter, samples, gradient, encoders=("image",), seed=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.parameters()))   # original untouched
    assert rows.equals(again)                                                       # bit-for-bit repeatable
    img = rows[rows.map_modality == "image"]
    assert list(img.group.unique()) == [g for g, _ in adapter.randomization_order("image")]
    last = img[img.step == img.step.max()]
    assert (last.spearman < 0.9).all() and (last.ssim < 0.9).all()
    table = sanity_table(rows)
    assert table.shape == (2, len(adapter.randomization_order("image")))
    assert list(table.columns) == [g.split(".")[1] for g, _ in adapter.randomization_order("image")]
    assert table.loc[("grad", "image", "image"), "embeddings"] == pytest.approx(last[last.map_modality == "image"].spearman.mean())
    png = plot_sanity_curve(rows, tmp_path / "sanity.png")
    assert png.stat().st_size > 1000


def test_randomise_parameters_matches_scale_and_seed():
    w = torch.nn.Parameter(torch.randn(200, 50) * 3.0)
    gain = torch.nn.Parameter(torch.ones(64))
    bias = torch.nn.Parameter(torch.zeros(64))
    randomise_parameters([w, gain, bias], torch.Generator().manual_seed(0))
    assert abs(float(w.detach().std()) - 3.0) < 0.1 and abs(float(gain.detach().std()) - 1.0) < 0.3
    assert (bias == 0).all()
    base = torch.randn(20, 5)
    p1, p2, p3 = (torch.nn.Parameter(base.clone()) for _ in range(3))
    randomise_parameters([p1], torch.Generator().manual_seed(5))
    randomise_parameters([p2], torch.Generator().manual_seed(5))
    randomise_parameters([p3], torch.Generator().manual_seed(6))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3) and not torch.equal(p1.detach(), base)


def test_similarity_helpers_known_values():
    a = np.arange(16.0).reshape(4, 4)
    assert spearman(a, a ** 2) == 1.0 and spearman(a, -a) == -1.0
    assert np.isnan(spearman(a, np.ones_like(a)))
    assert ssim(a, 2 * a + 1) == pytest.approx(1.0)          # same after min-max normalisation


def test_bad_attribute_names_the_problem(adapter, samples):
    with pytest.raises(InputError, match="encoder"):
        cascading_randomisation(adapter, samples, edge_detector, encoders=("audio",), progress=False)

    def broken(adapter, samples):
        a = edge_detector(adapter, samples)
        a.image[1, 2, 2] = float("nan")
        return a
    with pytest.raises(InputError, match="'s1'"):
        cascading_randomisation(adapter, samples, broken, progress=False)


def test_attributor_factories_plug_in_with_per_pair_seeds(adapter, samples):
    from m2ib.core.attributor import Attributor
    from m2ib.core.seeds import pair_seed
    from m2ib.core.attributor import attribute_with, resolve

    class SeedMap(Attributor):
        """Map = the pair's seed everywhere: shows which seed each pair received."""
        name = "seedmap"
        defaults = {"modalities": ["image"]}

        def explain(self, pixels, text, seeds):
            img = torch.tensor(seeds, dtype=torch.float32)[:, None, None].expand(-1, *self.adapter.image_size)
            return img.clone(), None, {}

    fn = resolve(lambda ad: SeedMap(ad))                     # a factory: one required argument
    one, three = attribute_with(lambda ad: SeedMap(ad), batch_size=1)(adapter, samples), fn(adapter, samples)
    assert torch.equal(one.image, three.image)               # batching does not change a pair's seed
    assert one.image[:, 0, 0].tolist() == [float(np.float32(pair_seed(s.id))) for s in samples]
    with pytest.raises(InputError, match="callable"):
        resolve(42)


def test_the_metric_checks_the_first_pairs_only_and_skips_a_method_fitted_to_the_weights(adapter, samples, caplog):
    from m2ib.core.metric import METRICS, MetricContext
    score = METRICS.get("sanity").score
    original = gradient(adapter, samples)
    context = MetricContext(attribute=gradient, seed=0)
    rows = score(original, adapter, samples, context, encoders=["text"], pairs=2)
    assert sorted(set(rows["sample_id"])) == ["s0", "s1"]
    full = score(original, adapter, samples, context, encoders=["text"])
    assert sorted(set(full["sample_id"])) == ["s0", "s1", "s2"]
    pd.testing.assert_frame_equal(rows, full[full["sample_id"] != "s2"].reset_index(drop=True))
    with pytest.raises(InputError, match="pairs must be an integer >= 0"):
        score(original, adapter, samples, context, pairs=-1)
    fitted = MetricContext(attribute=gradient, fitted_to_weights=True)
    with caplog.at_level("WARNING"):
        assert score(original, adapter, samples, fitted).empty
    assert "fitted to the model's weights" in caplog.text
