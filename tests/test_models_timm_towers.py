"""open_clip models with timm image towers (OpenClipTimmAdapter): SigLIP- and EVA02-shaped tiny random
models built fully offline (tests/tiny_models.py: timm's own vit_base_patch16_siglip_224 /
eva02_base_patch16_clip_224 architectures at width 32, 64 px). The full-size EVA02-B-16 / ViT-B-16-SigLIP
with random weights are checked by a one-off script instead (its build alone takes 3-25 s on the shared 2 cores), and
the refusals (unknown model, bad layer, SigLIP tokenizer not cached).

SigLIP's real tokenizer (Hub repo timm/ViT-B-16-SigLIP) is a download; the tiny SigLIP uses a local
word-level Hugging Face tokenizer with the same layout (no start token, words, '</s>', padded with '</s>')
through the same open_clip HFTokenizer path.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError, ModelUnavailableError, UnsupportedError
from m2ib.models.open_clip_hf import run_timm_block
from m2ib.models.open_clip_timm import OpenClipTimmAdapter
from tiny_models import write_tiny_timm_tower_models

#: float32 reassociation between the module calls and the written-out blocks (embeddings are unit vectors)
ATOL = 2e-5
TINY = ("m2ib-tiny-siglip", "m2ib-tiny-eva02", "m2ib-tiny-eva-fused")
CAPTIONS = ["a red circle", "the small dog on the left of a photo"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import open_clip
    from m2ib.models.sources import load_adapter
    paths = write_tiny_timm_tower_models(tmp_path_factory.mktemp("tiny_towers"))
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        for name in TINY:
            open_clip.add_model_config(paths[name])
            out[name] = load_adapter(name, pretrained=None, seed=0)
    return out


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (60 + 20 * i, 80, 3), dtype=np.uint8)) for i in range(2)]


def _inputs(a, images):
    return a.preprocess(images), a.tokenize(CAPTIONS)


def _reference(a, px, text):
    with torch.no_grad():
        return a.model.encode_image(px, normalize=True), a.model.encode_text(text.ids, normalize=True)


def test_family_grid_prefix_tokens_and_pooling(models, pixels):
    sig, eva, fused = (models[n] for n in TINY)
    assert all(isinstance(a, OpenClipTimmAdapter) and a.family == "open_clip_timm" for a in (sig, eva, fused))
    assert sig.grid_size == eva.grid_size == (8, 8) and sig.image_size == (64, 64)
    assert sig.num_prefix == 0 and eva.num_prefix == 1           # SigLIP has no class token
    px = sig.preprocess(pixels)
    assert sig.prefix("image", px, 0).shape == (2, 64, 32) and eva.prefix("image", px, 0).shape == (2, 65, 32)
    assert sig.token_positions("image", px).shape == (2, 64) and eva.token_positions("image", px).shape == (2, 65)
    # one pooled token (EVA02's class token) or all positions (SigLIP's attention-pool head, mean pooling)
    assert eva.pooled_position("image", px).tolist() == [0, 0]
    assert sig.pooled_position("image", px) is None and fused.pooled_position("image", px) is None


@pytest.mark.parametrize("name", TINY)
def test_prefix_suffix_match_model_at_every_valid_layer(models, pixels, name):
    a = models[name]
    px, text = _inputs(a, pixels)
    ref_img, ref_txt = _reference(a, px, text)
    with torch.no_grad():
        for layer in range(a.last_valid_layer("image") + 1):
            out = a.suffix("image", a.prefix("image", px, layer), px, layer)
            torch.testing.assert_close(out, ref_img, atol=ATOL, rtol=0, msg=f"{name} image layer {layer}")
        for layer in range(a.last_valid_layer("text") + 1):
            out = a.suffix("text", a.prefix("text", text, layer), text, layer)
            torch.testing.assert_close(out, ref_txt, atol=ATOL, rtol=0, msg=f"{name} text layer {layer}")
        # copies of the hidden state (M2IB's batch of noise draws) map to copies of the embedding
        layer = a.last_valid_layer("image")
        h = a.prefix("image", px, layer).repeat_interleave(3, 0)
        torch.testing.assert_close(a.suffix("image", h, px, layer), ref_img.repeat_interleave(3, 0), atol=ATOL, rtol=0)
        h = a.prefix("text", text, 0).repeat_interleave(2, 0)
        torch.testing.assert_close(a.suffix("text", h, text, 0), ref_txt.repeat_interleave(2, 0), atol=ATOL, rtol=0)
        # not vacuous: other inputs give other embeddings
        assert (a.encode_text(a.tokenize(["a green square", "the cat"])) - ref_txt).abs().max() > 1e-3
        assert (a.encode_image(px.flip(-1)) - ref_img).abs().max() > 1e-4


def test_last_valid_layer_follows_what_reaches_the_embedding(models, pixels):
    """The rule, checked on the models themselves: the gradient of the embedding w.r.t. the last block's
    output is zero at every position but the pooled one for a class-token tower (EVA02), non-zero at
    every patch for an attention-pool head (SigLIP) or mean pooling."""
    sig, eva, fused = (models[n] for n in TINY)
    assert [a.last_valid_layer("image") for a in (sig, eva, fused)] == [2, 1, 2]
    assert [a.last_valid_layer("text") for a in (sig, eva, fused)] == [1, 1, 1]
    for a in (sig, eva, fused):
        px = a.preprocess(pixels[:1])
        n = a.num_layers["image"]
        with torch.no_grad():
            before_last = a.prefix("image", px, n - 2)
        h = run_timm_block(a.trunk.blocks[-1], before_last, rope=a._rope).detach().requires_grad_(True)
        pooled = a.trunk.forward_head(a.trunk.norm(h))
        a.visual.head(pooled).sum().backward()
        reach = h.grad[0].abs().sum(-1) > 0
        patches = reach[a.num_prefix:]
        if a is eva:
            assert reach[0] and not patches.any()
        else:
            assert patches.all()
    # M2IB defaults and Grad-CAM follow the same rule
    assert sig.default_m2ib_settings()["image_layer"] == 2 and eva.default_m2ib_settings()["image_layer"] == 1
    assert sig.gradcam_target("image")[0] is sig.trunk.blocks[2]
    assert eva.gradcam_target("image")[0] is eva.trunk.blocks[1]
    assert sig.gradcam_target("text")[0] is sig.text.blocks[1]


def test_open_clip_vit_with_mean_pooling_allows_its_last_block(tmp_path, pixels):
    """The same rule in the open_clip ViT family: pool_type 'avg' reads every patch token."""
    import json
    import open_clip
    from m2ib.models.sources import CONFIG_DIR, load_adapter
    cfg = json.loads((CONFIG_DIR / "m2ib-tiny-vit.json").read_text())
    cfg["vision_cfg"]["pool_type"] = "avg"
    (tmp_path / "m2ib-tiny-vit-avg.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "m2ib-tiny-vit-avg.json")
    a = load_adapter("m2ib-tiny-vit-avg", pretrained=None)
    px = a.preprocess(pixels)
    assert a.last_valid_layer("image") == 2 and a.pooled_position("image", px) is None
    with torch.no_grad():
        ref = a.model.encode_image(px, normalize=True)
        for layer in range(3):
            out = a.suffix("image", a.prefix("image", px, layer), px, layer)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_timm_bert_with_mean_pooling_allows_last_blocks(tmp_path, pixels):
    """The same rule in the timm + BERT family: mean-pooled image ('avg') and text (mean pooler) towers."""
    import open_clip
    from m2ib.models.sources import load_adapter
    from tiny_models import write_tiny_hf_model
    open_clip.add_model_config(write_tiny_hf_model(tmp_path, name="m2ib-tiny-bert-mean", timm_pool="avg",
                                                   pooler="mean_pooler"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        a = load_adapter("m2ib-tiny-bert-mean", pretrained=None)
    assert a.last_valid_layer("image") == 5 and a.last_valid_layer("text") == 2
    px, text = a.preprocess(pixels), a.tokenize(["the left lung", "a small opacity"])
    assert a.pooled_position("text", text) is None
    ref_img, ref_txt = _reference(a, px, text)
    with torch.no_grad():
        torch.testing.assert_close(a.suffix("image", a.prefix("image", px, 5), px, 5), ref_img, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.suffix("text", a.prefix("text", text, 2), text, 2), ref_txt, atol=ATOL, rtol=0)


def test_layer_refusals_name_the_model_and_the_valid_range(models, pixels):
    sig, eva = models["m2ib-tiny-siglip"], models["m2ib-tiny-eva02"]
    px = sig.preprocess(pixels)
    with pytest.raises(InputError, match=r"m2ib-tiny-eva02.*0\.\.1 \(after the last block only the pooled token"):
        eva.prefix("image", px, 2)
    with pytest.raises(InputError, match=r"m2ib-tiny-siglip.*0\.\.2 \(every block's output still reaches"):
        sig.prefix("image", px, 3)
    with pytest.raises(InputError, match=r"text layer 2 .*0\.\.1"):
        sig.check_layer("text", 2)
    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match="layer"):
            sig.check_layer("image", bad)


def test_siglip_text_tower_bidirectional_last_position(models):
    sig = models["m2ib-tiny-siglip"]
    text = sig.tokenize(["A red circle!", "the small dog on the left of a photo"])
    assert text.tokens[0][:5] == ["a", "red", "circle", "</s>", ""]       # canonicalized, no start token
    assert text.eot.tolist() == [3, 9] and text.ids.shape == (2, 16)
    assert text.word_mask[0].tolist() == [True] * 3 + [False] * 13
    # 15 words + '</s>' fill the 16 positions exactly; 16 words are cut (flagged, '</s>' kept last)
    words = ["red circle dog cat lung"] * 3
    with pytest.warns(UserWarning, match="caption 1 has 17 tokens"):
        full = sig.tokenize([" ".join(words), " ".join(words + ["a"])])
    assert full.truncated == [False, True] and full.eot.tolist() == [15, 15] and full.tokens[1][15] == "</s>"
    assert full.word_mask.sum(1).tolist() == [15, 15]
    # the full context runs and every position is a bottleneck position; the last one is pooled
    assert sig.prefix("text", text, 0).shape == (2, 16, 32)
    assert sig.token_positions("text", text).all() and sig.token_positions("text", text).shape == (2, 16)
    assert sig.pooled_position("text", text).tolist() == [15, 15]
    # ... because padding does reach the embedding (no padding mask): its gradient is non-zero
    h = sig.prefix("text", text, 0).detach().requires_grad_(True)
    sig.suffix("text", h, text, 0).sum().backward()
    assert (h.grad[0, 4:].abs().sum(-1) > 0).all()
    eva = models["m2ib-tiny-eva02"]
    text = eva.tokenize(CAPTIONS)          # causal CLIP tower: cut after the last EOT, SOT..EOT positions
    assert eva.prefix("text", text, 0).shape[1] == int(text.eot.max()) + 1
    assert eva.pooled_position("text", text).tolist() == text.eot.tolist()


@pytest.mark.parametrize("name", TINY)
def test_record_attention_leaves_embeddings_unchanged(models, pixels, name):
    a = models[name]
    px, text = _inputs(a, pixels)
    ref_img, ref_txt = _reference(a, px, text)
    n_img = 64 + a.num_prefix
    with a.record_attention("image") as att:
        emb = a.encode_image(px)
    assert len(att) == a.num_layers["image"] and att[0].shape == (2, 2, n_img, n_img)
    torch.testing.assert_close(att[-1].sum(-1), torch.ones(2, 2, n_img))
    torch.testing.assert_close(emb, ref_img, atol=ATOL, rtol=0)      # the written-out blocks (RoPE included)
    with a.record_attention("text") as att:
        emb = a.encode_text(text)
    assert len(att) == a.num_layers["text"]
    torch.testing.assert_close(emb, ref_txt, atol=ATOL, rtol=0)
    upper = torch.triu(torch.ones(att[0].shape[-2:], dtype=torch.bool), 1)
    assert (att[0][..., upper].abs().max() == 0) == a.text_causal


@pytest.mark.parametrize("name", TINY)
def test_attention_parts_and_embed_hidden(models, pixels, name):
    """The Grad-ECLIP / LeGrad hooks on both towers (pooling by class token, attention-pool head, mean;
    RoPE; fused and separate q/k/v): parts[l]['hidden'] is prefix() after block l, the last one sent
    through embed_hidden is the embedding, and probs @ v is the recorded per-head output."""
    a = models[name]
    px, text = _inputs(a, pixels)
    for modality, inputs in (("image", px), ("text", text)):
        with torch.no_grad(), a.record_attention(modality, parts=True) as rec:
            emb = a.encode(modality, inputs)
        assert len(rec.parts) == len(rec) == a.num_layers[modality]
        with torch.no_grad():
            for layer in range(a.num_layers[modality] - 1):
                torch.testing.assert_close(rec.parts[layer]["hidden"], a.prefix(modality, inputs, layer), atol=ATOL,
                                           rtol=0)
            torch.testing.assert_close(a.embed_hidden(modality, rec.parts[-1]["hidden"], inputs), emb, atol=ATOL,
                                       rtol=0)
        for probs, p in zip(rec, rec.parts):
            torch.testing.assert_close(probs @ p["v"], p["out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["m2ib-tiny-siglip", "m2ib-tiny-eva02"])
def test_text_from_embeddings_and_randomization_order(models, pixels, name):
    a = models[name]
    _, text = _inputs(a, pixels)
    L = int(a.token_positions("text", text).shape[1])
    emb = a.embed_tokens(text)[:, :L].clone().requires_grad_(True)
    out = a.encode_text_from_embeddings(emb, text)
    torch.testing.assert_close(out, _reference(a, *_inputs(a, pixels))[1], atol=ATOL, rtol=0)
    out.sum().backward()
    assert emb.grad[0, 1].abs().sum() > 0
    for modality, tower in (("image", a.model.visual), ("text", a.model.text)):
        groups = a.randomization_order(modality)
        ids = [id(p) for _, ps in groups for p in ps]
        assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in tower.parameters()}, modality
        assert groups[0][0] == f"{modality}.projection" and groups[-1][0] == f"{modality}.embeddings"


def test_unknown_unhandled_and_uncached_tokenizer_refused_in_one_line(monkeypatch, tmp_path):
    import json
    import open_clip
    from m2ib.models.sources import CONFIG_DIR, load_adapter
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="unknown model.name 'EVA03-B-16'.*hf-hub:org/repo"):
        load_adapter("EVA03-B-16")
    # a config no family handles: a text tower with CoCa's appended class token
    cfg = json.loads((CONFIG_DIR / "m2ib-tiny-vit.json").read_text())
    cfg["custom_text"], cfg["text_cfg"]["embed_cls"] = True, True
    (tmp_path / "m2ib-tiny-cls-text.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "m2ib-tiny-cls-text.json")
    with pytest.raises(UnsupportedError, match=r"^m2ib-tiny-cls-text: .*class token \(CoCa\).*use e\.g\.") as err:
        load_adapter("m2ib-tiny-cls-text")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelUnavailableError) as err:     # before the model is built
        load_adapter("ViT-B-16-SigLIP", pretrained=None)
    msg = str(err.value)
    assert "\n" not in msg and "timm/ViT-B-16-SigLIP" in msg and "open_clip.get_tokenizer('ViT-B-16-SigLIP')" in msg
    assert "model.name=ViT-B-16-SigLIP" in msg
