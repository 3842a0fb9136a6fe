"""The Hugging Face transformers CLIP adapter on a tiny random CLIPModel written offline with save_pretrained:
prefix/suffix against the model's own get_image_features/get_text_features at every layer, the whole adapter
interface (every registered method runs on it), bad input, explain() and a Hydra run, and the bridge: the same
weights converted to open_clip give the same embeddings, the same M2IB capacities and the same Grad-ECLIP and
LeGrad maps through both adapters."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2ib.core.attributor import get_method
from m2ib.core.errors import InputError, ModelUnavailableError, UnsupportedError
from m2ib.models.hf_clip import HFCLIPAdapter, open_clip_state_dict
from m2ib.models.sources import load_adapter
from test_models_registry import _fake_hub_repo
from tiny_models import write_tiny_hf_clip

ROOT = Path(__file__).resolve().parents[1]
#: float32 through the same arithmetic in a different order (sdpa vs eager, query-only last block)
ATOL = 2e-6
#: the bridge: the same weights and noise through two code paths differ only by float32 rounding
BRIDGE_RTOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip") / "clip")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf(folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_adapter(f"hf:{folder}")


@pytest.fixture(scope="module")
def inputs(hf, pairs):
    images, captions = pairs
    return hf.preprocess(images), hf.tokenize(captions)


def _reference(hf, pixels, text):
    with torch.no_grad():
        img = hf.model.get_image_features(pixel_values=pixels).pooler_output
        txt = hf.model.get_text_features(input_ids=text.ids).pooler_output
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_family_shapes_and_defaults(hf, inputs, folder):
    pixels, text = inputs
    assert isinstance(hf, HFCLIPAdapter) and hf.family == "hf_clip" and hf.source.kind == "hf-transformers"
    assert hf.image_size == (32, 32) and hf.grid_size == (4, 4) and hf.num_prefix == 1
    assert hf.num_layers == {"image": 3, "text": 3} and hf.context_length == 77
    assert pixels.shape == (3, 3, 32, 32) and text.ids.shape == (3, 77)
    assert len(hf.weights_digest()) == 64          # the attribution cache keys the model by the loaded weights
    # no published setting for a tiny model: the rule (layer 9 clipped to the last valid layer, beta 0.1)
    assert hf.default_m2ib_settings() == {"image_layer": 1, "text_layer": 1, "image_beta": 0.1, "text_beta": 0.1}
    with torch.no_grad():
        assert hf.prefix("image", pixels, 0).shape == (3, 17, 64)
        assert hf.prefix("text", text, 0).shape == (3, int(text.eot.max()) + 1, 32)


def test_prefix_suffix_match_model_every_layer(hf, inputs):
    pixels, text = inputs
    ref_img, ref_txt = _reference(hf, pixels, text)
    with torch.no_grad():
        torch.testing.assert_close(hf.encode_image(pixels), ref_img, atol=ATOL, rtol=0)
        torch.testing.assert_close(hf.encode_text(text), ref_txt, atol=ATOL, rtol=0)
        for m, x, ref in (("image", pixels, ref_img), ("text", text, ref_txt)):
            for layer in range(hf.num_layers[m] - 1):
                out = hf.suffix(m, hf.prefix(m, x, layer), x, layer)
                torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=f"{m} layer {layer}")
                copies = hf.prefix(m, x, layer).repeat_interleave(3, dim=0)
                torch.testing.assert_close(hf.suffix(m, copies, x, layer), ref.repeat_interleave(3, 0),
                                           atol=ATOL, rtol=0)
        # the comparison is not vacuous: another caption changes the embedding
        assert (hf.encode_text(hf.tokenize(["a dog", "a cat", "the sun"])) - ref_txt).abs().max() > 1e-3


def test_tokens_word_mask_eot_unpadded(hf, inputs, tiny_adapter):
    _, text = inputs
    eos = hf.tokenizer.eos_token_id
    assert text.eot.tolist() == [4, 11, 2] and (text.ids[torch.arange(3), text.eot] == eos).all()
    assert text.tokens[0][:5] == ["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"]
    assert all(t == "" for t in text.tokens[0][5:])
    assert torch.equal(text.word_mask[0, :6].cpu(), torch.tensor([False, True, True, True, False, False]))
    # the bottleneck runs SOT..EOT only: the batch's longest caption, each row up to its own EOT
    pos = hf.token_positions("text", text)
    assert pos.shape == (3, 12) and pos[0].tolist() == [True] * 5 + [False] * 7 and pos[1].all()
    # the same ids, word mask and word strings as the open_clip adapter (both read OpenAI's BPE)
    caps = ["a café, naïve", "a big blue square on the left of the picture"]
    a, b = hf.tokenize(caps), tiny_adapter.tokenize(caps)
    assert torch.equal(a.word_mask, b.word_mask) and torch.equal(a.eot, b.eot)
    assert torch.equal(a.ids[a.word_mask], b.ids[b.word_mask])
    words = [[t for t, w in zip(row, m) if w] for row, m in zip(a.tokens, a.word_mask.tolist())]
    assert words == [[t for t, w in zip(row, m) if w] for row, m in zip(b.tokens, b.word_mask.tolist())]
    assert "".join(words[0]) == "acafé,naïve" and hf.blank_token_id == tiny_adapter.blank_token_id


def test_bad_and_long_captions(hf):
    with pytest.raises(InputError, match="caption 1"):
        hf.tokenize(["a dog", "  "])
    with pytest.warns(UserWarning, match="truncated"):
        tb = hf.tokenize([" ".join(["red"] * 100), "a cat"])
    assert tb.truncated == [True, False] and tb.eot[0] == 76 and tb.ids[0, 76] == hf.tokenizer.eos_token_id


def test_text_from_embeddings(hf, inputs):
    _, text = inputs
    emb = hf.embed_tokens(text)
    with torch.no_grad():
        torch.testing.assert_close(hf.encode_text_from_embeddings(emb, text), hf.encode_text(text), atol=ATOL, rtol=0)
    emb = emb.clone().requires_grad_(True)
    hf.encode_text_from_embeddings(emb, text).sum().backward()
    assert emb.grad[0, 1].abs().sum() > 0 and emb.grad[0, 5:].abs().sum() == 0   # after EOT: no effect


def test_record_attention(hf, inputs):
    pixels, text = inputs
    ref_img, ref_txt = _reference(hf, pixels, text)
    with hf.record_attention("text") as rec:
        out = hf.encode_text(text)
    torch.testing.assert_close(out, ref_txt, atol=ATOL, rtol=0)
    assert len(rec) == 3 and all(a.shape == (3, 2, 12, 12) for a in rec)
    for a in rec:
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 12), atol=1e-5, rtol=0)
        assert a.triu(1).abs().max() == 0                              # causal
    px = pixels.clone().requires_grad_(True)
    with hf.record_attention("image") as rec:
        out = hf.encode_image(px)
    torch.testing.assert_close(out.detach(), ref_img, atol=ATOL, rtol=0)
    assert len(rec) == 3 and rec[0].shape == (3, 2, 17, 17)
    assert torch.autograd.grad(out.sum(), rec[1])[0].abs().sum() > 0


def test_gradcam_target_and_randomization_order(hf, inputs):
    pixels, text = inputs
    for modality, x, grid in (("image", pixels, (4, 4)), ("text", text, (1, 12))):
        module, reshape = hf.gradcam_target(modality)
        seen = []
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            hf.encode(modality, x)
        finally:
            handle.remove()
        assert seen and tuple(reshape(seen[-1]).shape[2:]) == grid
    towers = {"image": [hf.model.vision_model, hf.model.visual_projection],
              "text": [hf.model.text_model, hf.model.text_projection]}
    for modality, mods in towers.items():
        groups = hf.randomization_order(modality)
        assert groups[0][0] == f"{modality}.projection" and groups[-1][0] == f"{modality}.embeddings"
        ids = [id(p) for _, ps in groups for p in ps]
        assert len(ids) == len(set(ids)) and set(ids) == {id(p) for m in mods for p in m.parameters()}


def test_preprocess_is_the_models_processor(hf, pairs, folder, tiny_adapter):
    from transformers import AutoImageProcessor
    images, _ = pairs
    proc = AutoImageProcessor.from_pretrained(folder, backend="pil")     # transformers 4.x's processor
    ref = proc(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(hf.preprocess(images), ref, atol=1e-6, rtol=0)
    # ... which is open_clip's transform where the crop overhang is even (here 8, 2, 2 px)
    torch.testing.assert_close(hf.preprocess(images), tiny_adapter.preprocess(images), atol=1e-6, rtol=0)
    shown = hf.to_display(ref)
    torch.testing.assert_close(torch.from_numpy(shown[0]).permute(2, 0, 1),
                               proc(images=images[0], do_normalize=False, return_tensors="pt")["pixel_values"][0],
                               atol=1e-5, rtol=0)
    # 50x40 image: shortest side 40 -> 32, width 40, centre crop of 32 removes 4 px each side
    boxes = hf.box_to_input_frame(np.array([[0, 0, 50, 40], [0, 0, 5, 40]]), (50, 40))
    np.testing.assert_allclose(boxes, [[0, 0, 32, 32], [0, 0, 0, 32]], atol=1e-4)


def test_boxes_follow_the_processors_crop_offset(hf):
    """An odd overhang: a 35x32 image loses 3 columns; HF crops from column 1 (rounded down), open_clip's
    torchvision crop from column 2. A white column at original x = 1 lands at x = 0, and so does its box."""
    arr = np.zeros((32, 35, 3), dtype=np.uint8)
    arr[:, 1] = 255
    shown = hf.to_display(hf.preprocess([Image.fromarray(arr)]))[0]
    assert shown[:, 0].min() > 0.99 and shown[:, 1:].max() < 0.01
    np.testing.assert_allclose(hf.box_to_input_frame(np.array([[1, 0, 1, 32]]), (35, 32)), [[0, 0, 1, 32]])


def test_bad_layer_names_model_and_range(hf, inputs):
    pixels, text = inputs
    with pytest.raises(InputError, match=r"hf:.*valid bottleneck layers are 0\.\.1"):
        hf.prefix("image", pixels, 2)
    with pytest.raises(InputError, match="text layer 7"):
        get_method("m2ib", hf, text_layer=7).attribute(pixels[:1], text.select([0]), [0])


# ---- bad input ----------------------------------------------------------------------------------------------
def test_hub_id_not_cached(tmp_path):
    with pytest.raises(ModelUnavailableError) as err:
        load_adapter("hf:openai/clip-vit-base-patch32", cache_dir=str(tmp_path / "empty-cache"))
    msg = str(err.value)
    assert "hf download openai/clip-vit-base-patch32" in msg and str(tmp_path / "empty-cache") in msg
    assert "model.name=hf:openai/clip-vit-base-patch32" in msg and "HF_HOME" in msg


def test_hub_id_from_the_cache_offline(tmp_path, folder, hf, inputs):
    files = {p.name: (lambda dst, src=p: shutil.copy(src, dst)) for p in folder.iterdir()}
    _fake_hub_repo(tmp_path / "cache", "m2ib-test/tiny-clip", files)
    adapter = load_adapter("hf:m2ib-test/tiny-clip", cache_dir=str(tmp_path / "cache"))
    pixels, text = inputs
    assert torch.equal(adapter.encode_image(pixels), hf.encode_image(pixels))
    assert adapter.weights_digest() == hf.weights_digest()          # a Hub model is keyed by its weights too
    del files["tokenizer.json"]
    _fake_hub_repo(tmp_path / "no_tok", "m2ib-test/tiny-clip", files)
    with pytest.raises(ModelUnavailableError, match=r"the tokenizer .* of Hugging Face Hub repo m2ib-test/tiny-clip "
                                                    r"not available.*\n.*hf download m2ib-test/tiny-clip"):
        load_adapter("hf:m2ib-test/tiny-clip", cache_dir=str(tmp_path / "no_tok"))


def _copy(folder, tmp_path, name, drop=()):
    out = tmp_path / name
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(*drop))
    return out


def test_folder_that_is_not_clip(tmp_path, folder):
    from transformers import BertConfig, SiglipConfig
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(InputError, match="'bert' model.*not a CLIPConfig"):
        load_adapter(f"hf:{bert}")
    siglip = tmp_path / "siglip"
    SiglipConfig().save_pretrained(siglip)
    with pytest.raises(UnsupportedError, match="SigLIP is not supported.*pools the LAST position"):
        load_adapter(f"hf:{siglip}")
    with pytest.raises(ModelUnavailableError, match="config.json missing in folder"):
        load_adapter(f"hf:{tmp_path / 'nowhere'}")


def test_weights_that_do_not_match_the_config(tmp_path, folder):
    deeper = _copy(folder, tmp_path, "deeper")
    cfg = json.loads((deeper / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 4
    (deeper / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="weights do not match its config.json.*missing keys"):
        load_adapter(f"hf:{deeper}")
    wider = _copy(folder, tmp_path, "wider")
    cfg = json.loads((wider / "config.json").read_text())
    cfg["projection_dim"] = 16
    (wider / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="weights do not match its config.json"):
        load_adapter(f"hf:{wider}")
    # a checkpoint file in another layout (open_clip's) for model.pretrained
    ckpt = tmp_path / "open_clip.pt"
    from transformers import CLIPModel
    torch.save(open_clip_state_dict(CLIPModel.from_pretrained(folder)), ckpt)
    with pytest.raises(InputError, match=f"keys of {ckpt} do not match.*missing keys"):
        load_adapter(f"hf:{folder}", pretrained=str(ckpt))
    narrow = tmp_path / "narrow.pt"
    torch.save({"visual_projection.weight": torch.zeros(16, 64)}, narrow)
    with pytest.raises(InputError, match="weights in .*narrow.pt do not match its config.json"):
        load_adapter(f"hf:{folder}", pretrained=str(narrow))
    with pytest.raises(ModelUnavailableError, match="not a checkpoint file.*model.name=hf:/path/to/folder"):
        load_adapter("hf:openai/clip-vit-base-patch32", pretrained=str(folder))


def test_tokenizer_or_processor_missing(tmp_path, folder):
    no_tok = _copy(folder, tmp_path, "no_tok", drop=("tokenizer*", "vocab.json", "merges.txt", "special_tokens*"))
    with pytest.raises(ModelUnavailableError, match="the tokenizer .* missing in folder"):
        load_adapter(f"hf:{no_tok}")
    no_proc = _copy(folder, tmp_path, "no_proc", drop=("preprocessor_config.json",))
    with pytest.raises(ModelUnavailableError, match="preprocessor_config.json missing"):
        load_adapter(f"hf:{no_proc}")
    cfg = json.loads((no_proc.parent / "no_tok" / "preprocessor_config.json").read_text())
    cfg["crop_size"] = {"height": 48, "width": 48}
    (no_proc / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="must resize the shortest side to 32 and centre-crop 32x32"):
        load_adapter(f"hf:{no_proc}")


def test_finetuned_checkpoint_file(tmp_path, folder, hf, inputs):
    from safetensors.torch import save_file
    state = {k: v.clone() for k, v in hf.model.state_dict().items()}
    state["visual_projection.weight"] *= -1
    path = tmp_path / "finetuned.safetensors"
    save_file(state, str(path))
    other = load_adapter(f"hf:{folder}", pretrained=str(path))
    pixels, _ = inputs
    torch.testing.assert_close(other.encode_image(pixels), -hf.encode_image(pixels), atol=ATOL, rtol=0)
    assert other.weights_digest() != hf.weights_digest()


# ---- the bridge: the same weights through open_clip ---------------------------------------------------------
@pytest.fixture(scope="module")
def bridged(hf, tmp_path_factory):
    """HF CLIPModel -> open_clip_state_dict -> open_clip m2ib-tiny-vit (same shape, GELU) via a local
    checkpoint file."""
    ckpt = tmp_path_factory.mktemp("bridge") / "converted.pt"
    torch.save(open_clip_state_dict(hf.model), ckpt)
    return load_adapter("m2ib-tiny-vit", pretrained=str(ckpt))


def test_bridge_to_open_clip_same_embeddings_and_m2ib(hf, bridged, inputs):
    """The same pixels and ids give the same embeddings through both adapters, and M2IB (same pair seeds,
    so the same noise) the same capacities at both image and text bottlenecks."""
    pixels, _ = inputs
    oc = bridged
    caps = ["a red circle", "a big blue square on the left of the picture", "green"]
    t_hf, t_oc = hf.tokenize(caps), oc.tokenize(caps)
    with torch.no_grad():
        emb = {m: (hf.encode(m, x_hf), oc.encode(m, x_oc))
               for m, x_hf, x_oc in (("image", pixels, pixels), ("text", t_hf, t_oc))}
    for m, (a, b) in emb.items():
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=m)
    seeds = [5, 6, 7]
    hp = {"image_layer": 1, "text_layer": 1, "steps": 4, "copies": 3}
    r_hf = get_method("m2ib", hf, **hp).attribute(pixels, t_hf, seeds)
    r_oc = get_method("m2ib", oc, **hp).attribute(pixels, t_oc, seeds)
    for key in ("image_capacity", "text_capacity"):
        a, b = r_hf.meta[key], r_oc.meta[key]
        assert a.abs().max() > 0
        rel = ((a - b).abs().max() / b.abs().max()).item()
        print(f"bridge {key}: max relative difference {rel:.2e}")
        assert rel <= BRIDGE_RTOL, key
    print("bridge embeddings: max abs difference",
          {m: f"{(a - b).abs().max().item():.1e}" for m, (a, b) in emb.items()})
    torch.testing.assert_close(r_hf.image, r_oc.image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["grad_eclip", "legrad"])
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_bridge_grad_eclip_and_legrad_maps_agree(hf, bridged, inputs, pairs, name, variant):
    """The attention hooks (q/k/v/out/hidden parts, pooled_position, embed_hidden) of both adapters give the
    same Grad-ECLIP and LeGrad image and text maps from the same weights. Tolerance BRIDGE_RTOL relative to
    the map's largest value; measured when written: at most 1.1e-6 (Grad-ECLIP text), LeGrad 4.6e-7."""
    pixels, text = inputs
    seeds = [0, 1, 2]
    a = get_method(name, hf, variant=variant, progress=False).attribute(pixels, text, seeds)
    b = get_method(name, bridged, variant=variant, progress=False).attribute(pixels, bridged.tokenize(pairs[1]), seeds)
    for modality in ("image", "text"):
        mine, theirs = getattr(a, modality), getattr(b, modality)
        assert theirs.abs().max() > 0 and mine.shape == theirs.shape
        rel = ((mine - theirs).abs().max() / theirs.abs().max()).item()
        print(f"bridge {name} {variant} {modality}: max relative difference {rel:.1e}")
        assert rel <= BRIDGE_RTOL, modality


def test_bridge_quick_gelu(hf, inputs):
    """OpenAI's checkpoints use quick_gelu (hidden_act 'quick_gelu'): with it on both sides the conversion
    still gives the same embeddings (open_clip needs force_quick_gelu / a '-quickgelu' config)."""
    import copy

    import open_clip
    from transformers.activations import ACT2FN
    pixels, text = inputs
    model = copy.deepcopy(hf.model)
    for tower in (model.vision_model, model.text_model):
        for layer in tower.encoder.layers:
            layer.mlp.activation_fn = ACT2FN["quick_gelu"]
    oc = open_clip.create_model("m2ib-tiny-vit", pretrained=None, force_quick_gelu=True).eval()
    oc.load_state_dict(open_clip_state_dict(model), strict=True)
    with torch.no_grad():
        ref = F.normalize(model.get_text_features(input_ids=text.ids).pooler_output, dim=-1)
        torch.testing.assert_close(oc.encode_text(text.ids.clamp_max(49407), normalize=True), ref, atol=ATOL, rtol=0)
        ref = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        torch.testing.assert_close(oc.encode_image(pixels, normalize=True), ref, atol=ATOL, rtol=0)
        assert (ref - hf.encode_image(pixels)).abs().max() > 1e-4      # the activation matters


# ---- the front doors ----------------------------------------------------------------------------------------------
def test_explain_and_hydra_run_on_a_local_folder(tmp_path, folder, hf):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from m2ib.api import explain
    from m2ib.data.embedded import load_embedded_split
    from m2ib.pipeline.experiment import run_experiment
    samples = load_embedded_split("test", limit=2, progress=False)
    att = explain(hf, [s.image for s in samples], [s.caption for s in samples])
    assert att.image.shape == (2, 32, 32) and torch.isfinite(att.text).all()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=hf_clip_vit_b32", f"model.name=hf:{folder}", "data.limit=2",
                                           "method=[m2ib]", "metric=[localisation]", "method.m2ib.steps=2", "method.m2ib.copies=2"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), write_results=False, figures=False, progress=False)
    table = run_experiment(cfg, run_dir=tmp_path / "run")["table"]
    assert set(table.modality) == {"image", "text"} and len(table) == 2


def test_hydra_run_offline_gives_the_download_message(tmp_path, monkeypatch):
    """What scripts/run.py model=hf_clip_vit_b32 logs (one M2IBError message, exit code 2) on a machine
    without the weights."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from m2ib.pipeline.experiment import run_experiment
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["model=hf_clip_vit_b32", "data.limit=1"]), resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), write_results=False, figures=False, progress=False)
    with pytest.raises(ModelUnavailableError, match="hf download openai/clip-vit-base-patch32"):
        run_experiment(cfg, run_dir=tmp_path / "run")
