"""The open_clip ModifiedResNet adapter on a tiny random RN (m2ib-tiny-resnet: stages [1, 1, 1, 1], width 16,
64 px, all residual branches active): split encoders reproduce open_clip's own forward at every stage,
per-stage grids, the last stage as a bottleneck, Grad-CAM target, attention refusal, randomisation
groups, display and box mapping."""
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError, UnsupportedError
from tiny_models import tiny_open_clip_resnet

ATOL = 1e-5      # float32 reassociation between open_clip's forward and ours (measured: 0 on CPU)


@pytest.fixture(scope="module")
def rn():
    return tiny_open_clip_resnet(None)


@pytest.fixture(scope="module")
def inputs(rn, pairs):
    images, captions = pairs
    return rn.preprocess(images), rn.tokenize(captions)


def test_family_grids_and_layers(rn):
    assert rn.family == "open_clip_resnet" and rn.num_prefix == 0
    assert rn.image_size == (64, 64) and rn.num_layers == {"image": 4, "text": 3}
    assert rn.stage_grids == [(16, 16), (8, 8), (4, 4), (2, 2)] and rn.grid_size == (2, 2)
    # the residual branches are active (open_clip zero-initialises their last BatchNorm)
    assert all(float(b.bn3.weight.abs().min()) > 0 for stage in rn.stages for b in stage)


def test_prefix_suffix_reproduce_model_at_every_layer(rn, inputs):
    pixels, text = inputs
    with torch.no_grad():
        ref_img = rn.model.encode_image(pixels, normalize=True)
        ref_txt = rn.model.encode_text(text.ids, normalize=True)
        for layer, (gh, gw) in enumerate(rn.stage_grids):
            hidden = rn.prefix("image", pixels, layer)
            assert hidden.shape == (3, gh * gw, 16 * 4 * 2 ** layer)      # stage width: 4 * width * 2**l
            torch.testing.assert_close(rn.suffix("image", hidden, pixels, layer), ref_img, atol=ATOL, rtol=0)
        for layer in range(rn.num_layers["text"] - 1):
            hidden = rn.prefix("text", text, layer)
            torch.testing.assert_close(rn.suffix("text", hidden, text, layer), ref_txt, atol=ATOL, rtol=0)
        torch.testing.assert_close(rn.encode_image(pixels), ref_img, atol=ATOL, rtol=0)


def test_tokens_are_row_major_positions(rn, inputs):
    """Token r * W + c of the hidden state is feature-map cell (r, c) of the stage's output."""
    pixels, _ = inputs
    with torch.no_grad():
        fmap = rn.visual.layer2(rn.visual.layer1(rn.visual.stem(pixels)))
        hidden = rn.prefix("image", pixels, 1)
    assert torch.equal(hidden[:, 3 * 8 + 5], fmap[:, :, 3, 5])


def test_last_stage_is_a_valid_layer_and_reaches_embedding_everywhere(rn, inputs):
    """After the last stage every position still reaches the embedding (the attention pool reads all
    of them), so the layer is valid and each position gets a non-zero gradient; text keeps the rule."""
    pixels, text = inputs
    last = rn.num_layers["image"] - 1
    assert rn.check_layer("image", last) == last == rn.last_valid_layer("image")
    assert rn.pooled_position("image", pixels) is None          # the attention pool reads every position
    assert rn.pooled_position("text", text).tolist() == text.eot.tolist()
    hidden = rn.prefix("image", pixels, last).requires_grad_(True)
    (grad,) = torch.autograd.grad(rn.suffix("image", hidden, pixels, last).sum(), hidden)
    assert (grad.abs().sum(-1) > 0).all()
    for bad in (-1, last + 1, 1.0, True):
        with pytest.raises(InputError, match="layer"):
            rn.prefix("image", pixels, bad)
    with pytest.raises(InputError, match="layer"):
        rn.prefix("text", text, rn.num_layers["text"] - 1)


def test_image_map_uses_the_grid_of_each_layer(rn, inputs):
    pixels, _ = inputs
    for layer, (gh, gw) in enumerate(rn.stage_grids):
        values = torch.zeros(2, gh * gw)
        values[0, 0] = 1.0                    # top-left cell
        values[1, gh * gw - 1] = 1.0          # bottom-right cell
        maps = rn.hidden_to_image_map(values)
        assert maps.shape == (2, 64, 64)
        assert maps[0, 0, 0] > maps[0, -1, -1] and maps[1, -1, -1] > maps[1, 0, 0]
    valid = rn.token_positions("image", pixels)
    assert valid.all() and valid.shape == (3, 16 * 16)
    with pytest.raises(InputError, match="no stage"):
        rn.hidden_to_image_map(torch.zeros(1, 7))


def test_suffix_accepts_copies_and_checks_length(rn, inputs):
    pixels, _ = inputs
    with torch.no_grad():
        hidden = rn.prefix("image", pixels, 1)
        out = rn.suffix("image", hidden.repeat_interleave(3, 0), pixels, 1)
    torch.testing.assert_close(out[::3], rn.suffix("image", hidden, pixels, 1))
    with pytest.raises(InputError, match="positions"):
        rn.suffix("image", hidden[:, :10], pixels, 1)


def test_gradcam_target_is_the_last_bottleneck(rn, inputs):
    pixels, _ = inputs
    module, reshape = rn.gradcam_target("image")
    assert module is rn.visual.layer4[-1]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        rn.encode_image(pixels)
    handle.remove()
    assert seen == [(3, 512, 2, 2)] and reshape(torch.ones(1, 2, 2, 2)).shape == (1, 2, 2, 2)
    assert rn.gradcam_target("text")[0] is rn.text.blocks[-2]


def test_attention_recording_refused_for_images_only(rn, inputs):
    pixels, text = inputs
    for parts in (False, True):
        with pytest.raises(UnsupportedError, match="ModifiedResNet") as err:
            rn.record_attention("image", parts=parts)
        assert rn.name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnsupportedError, match=rn.name):
        rn.embed_hidden("image", rn.prefix("image", pixels, 3), pixels)
    with torch.no_grad(), rn.record_attention("text", parts=True) as att:
        emb = rn.encode_text(text)
    assert len(att) == len(att.parts) == rn.num_layers["text"]
    # the text hooks Grad-ECLIP / LeGrad read: the last block's hidden state sent through the head is the embedding
    torch.testing.assert_close(rn.embed_hidden("text", att.parts[-1]["hidden"], text), emb, rtol=1e-5, atol=1e-6)


def test_randomization_order_covers_the_image_tower_top_down(rn):
    groups = rn.randomization_order("image")
    assert [g for g, _ in groups] == ["image.attnpool", "image.layer4", "image.layer3", "image.layer2",
                                      "image.layer1", "image.stem"]
    ids = [id(p) for _, ps in groups for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in rn.visual.parameters()}
    assert rn.randomization_order("text")[0][0] == "text.projection"


def test_display_and_boxes(rn):
    grey = Image.new("RGB", (80, 64), (128, 64, 32))
    shown = rn.to_display(rn.preprocess([grey]))
    assert shown.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(shown[0, 10, 10], np.array([128, 64, 32]) / 255, atol=2e-3)
    # 80x64 (w x h) -> shortest side 64 (80x64), centre crop 64: x offset 8
    boxes = rn.box_to_input_frame(np.array([[8.0, 0, 64, 64]]), (80, 64))
    np.testing.assert_allclose(boxes[0], [0, 0, 64, 64])


def test_m2ib_defaults_and_last_stage_bottleneck(rn, inputs):
    """Without published settings the image layer is IBA's ResNet-50 position (stage index 1, the conv3_x
    output); a model description's own value wins; M2IB also runs on the last stage."""
    from m2ib.core.attributor import get_method
    assert rn.default_m2ib_settings()["image_layer"] == 1
    described = rn.copy()
    described.m2ib_defaults = {"image_layer": 3}
    assert described.default_m2ib_settings()["image_layer"] == 3
    pixels, text = inputs
    att = get_method("m2ib", rn, image_layer=3, steps=2, copies=2, modalities=["image"],
                     progress=False).attribute(pixels[:1], text.select([0]), [0])
    assert att.image.shape == (1, 64, 64) and torch.isfinite(att.image).all() and att.image.std() > 0


def test_copy_is_independent_and_consistent(rn, inputs):
    """copy() (sanity checks, ROAR+) gives stages that belong to the copied model, not to this one."""
    pixels, _ = inputs
    other = rn.copy()
    assert other.stages[0] is other.visual.layer1 and other.stages[0] is not rn.visual.layer1
    with torch.no_grad():
        for p in other.randomization_order("image")[1][1]:       # layer4
            p.add_(1.0)
        assert not torch.allclose(other.encode_image(pixels), rn.encode_image(pixels))
        torch.testing.assert_close(rn.encode_image(pixels), rn.model.encode_image(pixels, normalize=True),
                                   atol=ATOL, rtol=0)


def test_multi_layer_m2ib_on_the_stages_is_refused_with_the_reason_before_it_runs(rn):
    from m2ib.core.attributor import get_method
    with pytest.raises(UnsupportedError, match="share.* one damping ratio, but its ResNet stages differ in grid"):
        get_method("m2ib", rn, image_layers=[0, 1], text_layers=[0], steps=1, copies=1)
    get_method("m2ib", rn, modalities=["text"], image_layers=[0, 1], text_layers=[0, 1], steps=1, copies=1)
