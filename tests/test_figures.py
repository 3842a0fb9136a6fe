"""Figures: maps go back onto the ORIGINAL image through the exact inverse of resize + centre crop,
token text stays readable on every shade, and every Attribution made by explain() or the pipeline
carries what a figure needs (never stored in the attribution cache)."""
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.api import explain
from m2ib.core.errors import InputError
from m2ib.core.figures import colour_table, method_grid, relative_luminance, save_figure, text_colour
from m2ib.core.geometry import InputFrame, boxes_to_input_frame
from m2ib.core.records import Attribution
from m2ib.pipeline.compute import compute_attributions


def test_a_quadrant_of_the_input_frame_lands_on_its_region_of_a_wide_original():
    """Original 120 x 60 (w x h), input 32 x 32, 'shortest': resized to 64 x 32, 16 px cropped each side,
    so input columns [0, 16) are original x in [30, 60) and only x in [30, 90) was seen."""
    frame = InputFrame((32, 32), "shortest")
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:16, :16] = 1.0                                          # the input frame's top-left quadrant
    out = frame.to_original(heat, (120, 60))
    assert out.shape == (60, 120)
    assert np.isnan(out[:, :30]).all() and np.isnan(out[:, 90:]).all()      # cropped away: never seen
    assert np.isfinite(out[:, 30:90]).all()
    # away from the quadrant's edge (bilinear blur of one input pixel = 2 original pixels): exact values
    assert np.allclose(out[:28, 30:58], 1.0) and np.allclose(out[32:, 30:90], 0.0) and np.allclose(out[:, 62:90], 0.0)
    assert frame.visible_rect((120, 60)) == (30.0, 0.0, 90.0, 60.0)


@pytest.mark.parametrize("mode, size", [("shortest", (50, 87)), ("shortest", (93, 40)), ("squash", (70, 30)),
                                        ("longest", (90, 45))])
def test_uncrop_is_the_inverse_of_the_forward_box_geometry(mode, size):
    """A map whose value is the input-frame x coordinate, read back at each original column, equals
    where boxes_to_input_frame (the forward rule, a separate implementation) sends that column."""
    frame = InputFrame((24, 24), mode)
    heat = np.tile(np.arange(24, dtype=np.float32) + 0.5, (24, 1))            # value = x of the pixel centre
    out = frame.to_original(heat, size)
    xs = np.arange(size[0]) + 0.5
    forward = boxes_to_input_frame(np.stack([xs, np.zeros_like(xs), np.zeros_like(xs), np.zeros_like(xs)], 1),
                                   size, (24, 24), mode)[:, 0]
    row = out[np.isfinite(out).all(1)][0] if np.isfinite(out).all(1).any() else out[size[1] // 2]
    inside = np.isfinite(row) & (forward > 0.5) & (forward < 23.5)   # bilinear is exact between pixel centres
    assert inside.sum() > size[0] // 3
    np.testing.assert_allclose(row[inside], forward[inside], atol=1e-4)   # float32 map values


def test_contrast_rule_dark_text_on_light_and_light_text_on_dark():
    assert text_colour((1, 1, 1)) == "black" and text_colour((0, 0, 0)) == "white"
    assert text_colour((1, 1, 0)) == "black" and text_colour((0, 0, 0.5)) == "white"
    jet = [tuple(int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)) for h in colour_table("jet")]
    assert text_colour(jet[0]) == "white" and text_colour(jet[-1]) == "white"   # the darkest shades
    for shade in jet:                           # WCAG AA (4.5:1) holds on every shade the figures use
        lum = relative_luminance(shade)
        ratio = (lum + 0.05) / 0.05 if text_colour(shade) == "black" else 1.05 / (lum + 0.05)
        assert ratio >= 4.5, (shade, ratio)


@pytest.fixture(scope="module")
def explained(tiny_adapter, pairs):
    images, captions = pairs
    return {m: explain(tiny_adapter, images[:2], captions[:2], method=m, ids=["p0", "p1"])
            for m in ("random", "saliency", "raw_attention")}


def test_a_grid_of_two_pairs_by_three_methods_saves_a_png(explained, tmp_path):
    path = save_figure(method_grid(explained), tmp_path / "grid.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
        assert len(set(map(tuple, np.asarray(im.convert("RGB"))[::7, ::7].reshape(-1, 3).tolist()))) > 50   # not blank
    with pytest.raises(InputError, match="different numbers of pairs"):
        method_grid({"a": explained["random"], "b": explained["saliency"].select([0])})


def test_every_explained_attribution_plots_on_its_original_image(explained, pairs, tiny_adapter, tmp_path):
    att = explained["saliency"]
    assert att.samples[1].image.size == pairs[0][1].size and att.frame == InputFrame.of(tiny_adapter)
    assert att.hparams is not None and att.select([1]).samples[0].id == "p1"
    path = att.save_figure(tmp_path / "one.png", row=1, boxes=np.array([[5.0, 5.0, 20.0, 10.0]]))
    assert path.is_file() and path.stat().st_size > 5000


def test_image_only_and_text_only_attributions_plot(tiny_adapter, pairs, tmp_path):
    images, captions = pairs
    for mods in (["image"], ["text"]):
        att = explain(tiny_adapter, images[:1], captions[:1], method="saliency", modalities=mods)
        assert (att.image is None) == (mods == ["text"]) and (att.text is None) == (mods == ["image"])
        assert att.save_figure(tmp_path / f"{mods[0]}.png").is_file()


def test_plotting_without_the_source_image_is_one_clear_line(explained, pairs):
    src = explained["random"]
    bare = Attribution("random", src.image, src.text, src.tokens, src.token_mask)   # made elsewhere: no context
    with pytest.raises(InputError, match=r"no source images; pass the original image \(plot\(row, image="):
        bare.plot(0)
    with pytest.raises(InputError, match="input frame is unknown; pass frame="):
        bare.plot(0, image=pairs[0][0])
    fig = bare.plot(0, image=pairs[0][0], frame=InputFrame(tuple(src.image.shape[1:]), "shortest"))
    assert fig.axes


def test_pipeline_attributions_carry_the_context_but_the_cache_rows_do_not(tiny_adapter, pairs, tmp_path):
    from m2ib.core.attributor import get_method
    from m2ib.core.records import Sample
    samples = [Sample(id=f"s{i}", image=im, caption=c) for i, (im, c) in enumerate(zip(*pairs))]
    attributor = get_method("random", tiny_adapter)
    att = compute_attributions(attributor, samples, tmp_path, {"model": "tiny"}, progress=False)
    again = compute_attributions(attributor, samples, tmp_path, {"model": "tiny"}, progress=False)   # from cache
    for a in (att, again):
        assert [s.id for s in a.samples] == ["s0", "s1", "s2"] and a.frame == InputFrame.of(tiny_adapter)
        assert a.hparams == attributor.identity()
    rows = list(tmp_path.glob("random-*/*.npz"))
    assert len(rows) == 3
    with np.load(rows[0]) as z:
        assert set(z.files) <= {"fingerprint", "image", "text", "token_mask", "tokens", "seconds"}
    assert torch.equal(att.image, again.image)


def test_the_timm_bert_family_plots_on_its_original_images(tmp_path):
    """Another adapter family (timm ViT + HF BERT, word-piece tokens): a grid and a single figure."""
    import open_clip
    from m2ib.models.sources import load_adapter
    from tiny_models import write_tiny_hf_model
    open_clip.add_model_config(write_tiny_hf_model(tmp_path / "hf", name="m2ib-figures-timm-bert"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        adapter = load_adapter("m2ib-figures-timm-bert", pretrained=None, seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)) for _ in range(2)]
    atts = [explain(adapter, images, ["the left lung opacity", "pleural effusions"], method=m)
            for m in ("random", "saliency")]
    assert atts[0].frame == InputFrame.of(adapter) and atts[0].samples[0].image.size == (200, 120)
    assert save_figure(method_grid(atts), tmp_path / "grid.png").stat().st_size > 10_000
    assert atts[1].save_figure(tmp_path / "one.png", row=1).is_file()
