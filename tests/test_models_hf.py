"""The timm-ViT + HF-BERT adapter (BiomedCLIP family) on a tiny random model built fully offline."""
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError
from m2ib.models.open_clip_hf import OpenClipHFAdapter
from tiny_models import write_tiny_hf_model

ATOL = 2e-5


def _build(folder, name, **kwargs):
    import open_clip
    from m2ib.models.sources import load_adapter
    path = write_tiny_hf_model(folder, name=name, **kwargs)
    open_clip.add_model_config(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_adapter(name, pretrained=None, seed=0)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tiny_hf"), "m2ib-test-timm-bert")


@pytest.fixture(scope="module")
def inputs(hf):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (120 + 30 * i, 200, 3), dtype=np.uint8)) for i in range(2)]
    captions = ["the left lung opacity", "a large pleural effusions in the lower lobe"]
    return hf.preprocess(images), hf.tokenize(captions)


def _reference(hf, pixels, text):
    with torch.no_grad():
        return (hf.model.encode_image(pixels, normalize=True), hf.model.encode_text(text.ids, normalize=True))


def test_family_and_shapes(hf, inputs):
    pixels, text = inputs
    assert isinstance(hf, OpenClipHFAdapter) and hf.family == "open_clip_hf"
    assert hf.image_size == (160, 160) and hf.grid_size == (10, 10)
    assert hf.num_layers == {"image": 6, "text": 3} and hf.context_length == 24
    assert pixels.shape == (2, 3, 160, 160) and text.ids.shape == (2, 24)
    with torch.no_grad():
        assert hf.prefix("image", pixels, 2).shape == (2, 101, 64)
        # text runs up to the longest caption's [SEP] (11 tokens), padding columns after it are dropped
        assert hf.prefix("text", text, 1).shape == (2, 11, 32)
        assert hf.encode_image(pixels).shape == (2, 16) and hf.encode_text(text).shape == (2, 16)


def test_prefix_suffix_match_model_every_layer(hf, inputs):
    pixels, text = inputs
    ref_img, ref_txt = _reference(hf, pixels, text)
    with torch.no_grad():
        torch.testing.assert_close(hf.encode_image(pixels), ref_img, atol=ATOL, rtol=0)
        torch.testing.assert_close(hf.encode_text(text), ref_txt, atol=ATOL, rtol=0)
        for layer in range(hf.num_layers["image"] - 1):
            out = hf.suffix("image", hf.prefix("image", pixels, layer), pixels, layer)
            torch.testing.assert_close(out, ref_img, atol=ATOL, rtol=0, msg=f"image layer {layer}")
        for layer in range(hf.num_layers["text"] - 1):
            out = hf.suffix("text", hf.prefix("text", text, layer), text, layer)
            torch.testing.assert_close(out, ref_txt, atol=ATOL, rtol=0, msg=f"text layer {layer}")
    # a changed input must change the embedding (the comparison above is not vacuous)
    other = hf.tokenize(["the right heart", "a small circle"])
    assert (hf.encode_text(other) - ref_txt).abs().max() > 1e-3


def test_suffix_accepts_copies(hf, inputs):
    pixels, text = inputs
    ref_img, ref_txt = _reference(hf, pixels, text)
    with torch.no_grad():
        h = hf.prefix("text", text, 1).repeat_interleave(3, dim=0)
        torch.testing.assert_close(hf.suffix("text", h, text, 1), ref_txt.repeat_interleave(3, 0), atol=ATOL, rtol=0)
        h = hf.prefix("image", pixels, 3).repeat_interleave(2, dim=0)
        torch.testing.assert_close(hf.suffix("image", h, pixels, 3), ref_img.repeat_interleave(2, 0), atol=ATOL, rtol=0)


def test_tokens_word_mask_and_eot(hf, inputs):
    _, text = inputs
    assert text.tokens[0][:6] == ["[CLS]", "the", "left", "lung", "opacity", "[SEP]"]
    assert text.tokens[1][4:6] == ["effusion", "##s"]
    assert all(t == "" for t in text.tokens[0][6:])
    assert text.eot.tolist() == [5, 10]
    assert text.ids[0, 5] == hf.tokenizer.tokenizer.sep_token_id
    expected = torch.zeros(2, 24, dtype=torch.bool)
    expected[0, 1:5] = True
    expected[1, 1:10] = True
    assert torch.equal(text.word_mask.cpu(), expected)
    assert text.truncated == [False, False]
    pos = hf.token_positions("text", text)
    assert pos.shape == (2, 11) and pos[0].tolist() == [True] * 6 + [False] * 5 and pos[1].all()
    assert hf.token_positions("image", torch.zeros(3, 3, 160, 160)).shape == (3, 101)


def test_tokenize_bad_and_long_captions(hf):
    with pytest.raises(InputError, match="caption 1"):
        hf.tokenize(["a dog", "   "])
    with pytest.raises(InputError):
        hf.tokenize([])
    long = " ".join(["left lung"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        tb = hf.tokenize([long, "a cat"])
    assert tb.truncated == [True, False]
    assert tb.eot[0] == 23 and tb.ids[0, 23] == hf.tokenizer.tokenizer.sep_token_id
    assert tb.word_mask[0].sum() == 22


def test_text_from_embeddings_matches_encode_text(hf, inputs):
    _, text = inputs
    emb = hf.embed_tokens(text)
    assert emb.shape == (2, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf.encode_text_from_embeddings(emb, text), hf.encode_text(text), atol=ATOL, rtol=0)
    emb = emb.clone().requires_grad_(True)
    hf.encode_text_from_embeddings(emb, text).sum().backward()
    assert emb.grad is not None and emb.grad[0, 1].abs().sum() > 0
    assert emb.grad[0, 10:].abs().sum() == 0          # padding does not reach the embedding


def test_record_attention(hf, inputs):
    pixels, text = inputs
    ref_img, ref_txt = _reference(hf, pixels, text)
    with hf.record_attention("text") as rec:
        out = hf.encode_text(text)
    assert len(rec) == 3 and all(a.shape == (2, 2, 11, 11) for a in rec)
    torch.testing.assert_close(out, ref_txt, atol=ATOL, rtol=0)
    for a in rec:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 11), atol=1e-5, rtol=0)
        assert a[0, :, :, 6:].abs().max() < 1e-6      # row 0's padding gets no attention
    px = pixels.clone().requires_grad_(True)
    with hf.record_attention("image") as rec:
        out = hf.encode_image(px)
    assert len(rec) == 6 and rec[0].shape == (2, 2, 101, 101) and rec[-1].requires_grad
    torch.testing.assert_close(out.detach(), ref_img, atol=ATOL, rtol=0)
    grad = torch.autograd.grad(out.sum(), rec[2])[0]
    assert grad.abs().sum() > 0
    with hf.record_attention("image") as rec2:        # recording stops when the block ends
        pass
    hf.encode_image(pixels)
    assert rec2 == []


def test_hidden_to_image_map(hf):
    values = torch.zeros(1, 101)
    values[0, 0] = 100.0                              # the class token must be dropped
    values[0, 1 + 3 * 10 + 7] = 1.0                   # patch row 3, col 7
    m = hf.hidden_to_image_map(values)
    assert m.shape == (1, 160, 160)
    y, x = divmod(int(m[0].argmax()), 160)
    assert 3 * 16 <= y < 4 * 16 and 7 * 16 <= x < 8 * 16


def test_gradcam_target_is_called_module(hf, inputs):
    pixels, text = inputs
    seen = []
    for modality, inp, grid in (("image", pixels, (10, 10)), ("text", text, (1, 11))):
        module, reshape = hf.gradcam_target(modality)
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            hf.encode(modality, inp)
        finally:
            handle.remove()
        assert seen, f"{modality} target layer was not called as a module"
        out = reshape(seen[-1])
        assert out.shape[0] == 2 and tuple(out.shape[2:]) == grid
    assert hf.gradcam_target("image")[0] is hf.trunk.blocks[-2]


def test_randomization_order_covers_each_tower(hf):
    for modality, tower in (("image", hf.model.visual), ("text", hf.model.text)):
        groups = hf.randomization_order(modality)
        names = [n for n, _ in groups]
        assert names[0] == f"{modality}.projection" and names[-1] == f"{modality}.embeddings"
        ids = [id(p) for _, ps in groups for p in ps]
        assert len(ids) == len(set(ids))
        tower_ids = {id(p) for p in tower.parameters()}
        assert set(ids) <= tower_ids and len(tower_ids - set(ids)) == 0


def test_copy_is_independent(hf, inputs):
    pixels, _ = inputs
    before = hf.encode_image(pixels)
    other = hf.copy()
    with torch.no_grad():
        for _, params in other.randomization_order("image")[:2]:
            for p in params:
                p.add_(torch.randn_like(p))
    assert (other.encode_image(pixels) - before).abs().max() > 1e-3
    torch.testing.assert_close(hf.encode_image(pixels), before)


def test_layer_checks_and_boxes(hf, inputs):
    pixels, text = inputs
    with pytest.raises(InputError, match="0..4"):
        hf.prefix("image", pixels, 5)
    with pytest.raises(InputError, match="0..1"):
        hf.prefix("text", text, 2)
    boxes = hf.box_to_input_frame(np.array([[0, 0, 200, 120]]), (200, 120))   # whole 200x120 image
    np.testing.assert_allclose(boxes, [[0, 0, 160, 160]], atol=1e-4)


@pytest.mark.parametrize("timm_pool,pooler", [("avg", "mean_pooler"), ("", "cls_pooler")])
def test_other_poolings_match_model(tmp_path, timm_pool, pooler):
    hf = _build(tmp_path, f"m2ib-test-{timm_pool or 'tok'}-{pooler}", timm_pool=timm_pool, pooler=pooler)
    rng = np.random.default_rng(1)
    pixels = hf.preprocess([Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))] * 2)
    text = hf.tokenize(["a red circle", "the upper lobe is large"])
    ref_img, ref_txt = _reference(hf, pixels, text)
    with torch.no_grad():
        for layer in (0, 3):
            torch.testing.assert_close(hf.suffix("image", hf.prefix("image", pixels, layer), pixels, layer),
                                       ref_img, atol=ATOL, rtol=0)
        torch.testing.assert_close(hf.suffix("text", hf.prefix("text", text, 1), text, 1), ref_txt, atol=ATOL, rtol=0)


def test_cpu_results_repeatable(tmp_path, inputs):
    pixels, text = inputs
    a = _build(tmp_path / "a", "m2ib-test-rep-a")
    b = _build(tmp_path / "b", "m2ib-test-rep-b")
    assert torch.equal(a.encode_image(pixels), b.encode_image(pixels))
    assert torch.equal(a.encode_text(text), b.encode_text(text))
