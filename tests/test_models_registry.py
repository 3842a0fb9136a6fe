"""load_adapter: family selection, weight sources (random / tag / file / hf-hub) and offline messages.

Every test runs with HF_HUB_OFFLINE=1 and an empty or fake Hugging Face cache under tmp_path, so
nothing touches the network and nothing depends on what this machine has cached."""
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError, ModelUnavailableError, UnsupportedError
from m2ib.models.offline import hub_offline_mode
from m2ib.models.sources import load_adapter

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _image_and_text(adapter):
    rng = np.random.default_rng(0)
    px = adapter.preprocess([Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))])
    return px, adapter.tokenize(["a red circle"])


def _fake_hub_repo(cache, repo, files: dict):
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<sha>/}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    for name, writer in files.items():
        writer(snap / name)
    return snap


def test_tiny_vit_family_and_seed():
    from m2ib.models.open_clip_vit import OpenClipViTAdapter
    a, b, c = (load_adapter("m2ib-tiny-vit", seed=s) for s in (0, 0, 1))
    assert isinstance(a, OpenClipViTAdapter)
    px, tb = _image_and_text(a)
    assert torch.equal(a.encode_image(px), b.encode_image(px))
    assert not torch.allclose(a.encode_image(px), c.encode_image(px))


def test_local_checkpoint_file(tmp_path):
    src = load_adapter("m2ib-tiny-vit", seed=3)
    path = tmp_path / "finetuned.pt"
    torch.save(src.model.state_dict(), path)
    loaded = load_adapter("m2ib-tiny-vit", pretrained=str(path), seed=0)
    px, tb = _image_and_text(src)
    torch.testing.assert_close(loaded.encode_image(px), src.encode_image(px), atol=0, rtol=0)
    torch.testing.assert_close(loaded.encode_text(tb), src.encode_text(tb), atol=0, rtol=0)
    assert not torch.allclose(load_adapter("m2ib-tiny-vit", seed=0).encode_image(px), src.encode_image(px))


def test_missing_and_corrupt_checkpoint(tmp_path):
    missing = tmp_path / "nowhere" / "cxr_clip.pt"
    with pytest.raises(ModelUnavailableError) as err:
        load_adapter("m2ib-tiny-vit", pretrained=str(missing))
    assert str(missing) in str(err.value) and "model.pretrained" in str(err.value)
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError) as err:         # there but unusable: a setting to fix, in one line
        load_adapter("m2ib-tiny-vit", pretrained=str(bad))
    assert str(bad) in str(err.value) and "model.pretrained" in str(err.value) and "\n" not in str(err.value)
    wrong = tmp_path / "wrong_arch.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(InputError, match="wrong_arch.pt"):
        load_adapter("m2ib-tiny-vit", pretrained=str(wrong))


def test_bad_names_and_tags():
    with pytest.raises(InputError, match="unknown model.name 'ViT-Q-99'"):
        load_adapter("ViT-Q-99")
    with pytest.raises(InputError) as err:
        load_adapter("ViT-B-32", pretrained="no_such_tag")
    assert "openai" in str(err.value) and "no_such_tag" in str(err.value)


def test_resnet_openai_weights_offline_message(tmp_path):
    """RN50 is served by the ResNet adapter; its OpenAI weights are a download, refused at once offline."""
    t0 = time.time()
    with pytest.raises(ModelUnavailableError) as err:
        load_adapter("RN50", pretrained="openai", cache_dir=str(tmp_path / "hf"))
    assert time.time() - t0 < 30
    for needle in ("timm/resnet50_clip.openai", "open_clip.create_model('RN50', pretrained='openai')",
                   str(tmp_path / "hf"), "model.pretrained", "model.name"):
        assert needle in str(err.value), needle


def test_timm_convnet_tower_refused(tmp_path):
    """A timm convolutional image tower (not open_clip's ModifiedResNet) has no adapter: one clear line."""
    cfg = {"embed_dim": 16, "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "m2ib-test-timm-resnet.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="timm convolutional network") as err:
        load_adapter(str(path))
    assert "\n" not in str(err.value) and "RN50" in str(err.value)


def test_offline_tag_message(tmp_path):
    t0 = time.time()
    with pytest.raises(ModelUnavailableError) as err:
        load_adapter("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert time.time() - t0 < 30
    for needle in ("HF_HUB_OFFLINE", "timm/vit_base_patch32_clip_224.openai",
                   "open_clip.create_model('ViT-B-32', pretrained='openai')", str(tmp_path / "hf"),
                   "model.pretrained", "model.name"):
        assert needle in msg, needle


def test_offline_hf_hub_message(tmp_path):
    t0 = time.time()
    with pytest.raises(ModelUnavailableError) as err:
        load_adapter(BIOMEDCLIP, cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert time.time() - t0 < 30
    for needle in ("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "create_model_from_pretrained",
                   str(tmp_path / "hf"), "HF_HOME", "model.name"):
        assert needle in msg, needle


def test_missing_local_dir(tmp_path):
    with pytest.raises(ModelUnavailableError, match="open_clip_config.json") as err:
        load_adapter(f"local-dir:{tmp_path / 'biomedclip'}")
    assert "model.name" in str(err.value)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """A tiny BiomedCLIP-shaped model in a fake HF cache (config + safetensors weights), built offline."""
    import open_clip
    from safetensors.torch import save_file
    from tiny_models import write_tiny_hf_model
    root = tmp_path_factory.mktemp("hub")
    cfg_path = write_tiny_hf_model(root / "src", name="m2ib-test-hub-src")
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(7)
    model = open_clip.create_model("m2ib-test-hub-src", pretrained=None, pretrained_text=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cfg = {"model_cfg": json.loads(cfg_path.read_text()),
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    _fake_hub_repo(root / "cache", "m2ib-test/tiny-biomedclip", {
        "open_clip_config.json": lambda p: p.write_text(json.dumps(cfg)),
        "open_clip_model.safetensors": lambda p: save_file(state, str(p)),
    })
    return root, model


def test_hf_hub_from_cache_offline(tiny_hub):
    root, model = tiny_hub
    adapter = load_adapter("hf-hub:m2ib-test/tiny-biomedclip", cache_dir=str(root / "cache"), seed=0)
    assert adapter.family == "open_clip_hf"
    px, tb = _image_and_text(adapter)
    with torch.no_grad():
        ref = model.encode_image(px, normalize=True)
    torch.testing.assert_close(adapter.encode_image(px), ref, atol=2e-5, rtol=0)
    # the hub repo's preprocess_cfg is used (mean 0.5, std 0.25): a mid-grey image maps to 0
    grey = adapter.preprocess([Image.new("RGB", (40, 40), (128, 128, 128))])
    assert grey.abs().max() < 0.02


def test_hf_hub_with_finetuned_checkpoint(tiny_hub, tmp_path):
    root, model = tiny_hub
    ft = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "biomedclip_finetuned.pt"
    torch.save(ft, path)
    adapter = load_adapter("hf-hub:m2ib-test/tiny-biomedclip", pretrained=str(path), cache_dir=str(root / "cache"))
    for k, v in adapter.model.state_dict().items():
        assert torch.equal(v.cpu(), ft[k]), k


def test_tag_from_cache_forces_quick_gelu(tmp_path, monkeypatch):
    """A tag whose weights were trained with QuickGELU must build the model with QuickGELU."""
    import open_clip
    from open_clip import pretrained as oc_pre
    from safetensors.torch import save_file
    torch.manual_seed(5)
    src = open_clip.create_model("m2ib-tiny-vit", pretrained=None, force_quick_gelu=True)
    _fake_hub_repo(tmp_path / "cache", "m2ib-test/tiny-vit-tag", {
        "open_clip_model.safetensors": lambda p: save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))})
    tags = dict(oc_pre._PRETRAINED.get("m2ib-tiny-vit", {}))
    tags["fake_qg"] = oc_pre._pcfg(hf_hub="m2ib-test/tiny-vit-tag/", quick_gelu=True)
    monkeypatch.setitem(oc_pre._PRETRAINED, "m2ib-tiny-vit", tags)
    adapter = load_adapter("m2ib-tiny-vit", pretrained="fake_qg", cache_dir=str(tmp_path / "cache"))
    acts = {type(m).__name__ for m in adapter.model.modules()}
    assert "QuickGELU" in acts
    px, tb = _image_and_text(adapter)
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode_image(px), src.encode_image(px, normalize=True), atol=2e-5, rtol=0)


def test_offline_mode_context_restores_state():
    import huggingface_hub.constants as hc
    before = hc.HF_HUB_OFFLINE
    with hub_offline_mode(True):
        assert hc.HF_HUB_OFFLINE is True
    assert hc.HF_HUB_OFFLINE == before


def test_offline_hub_text_tower_message():
    """A built-in config whose HF text tower lives on the Hub (roberta-ViT-B-32) fails at once, offline."""
    t0 = time.time()
    with pytest.raises(ModelUnavailableError) as err:
        load_adapter("roberta-ViT-B-32")
    assert time.time() - t0 < 30
    for needle in ("roberta-base", "HF_HUB_OFFLINE", "open_clip.get_tokenizer('roberta-ViT-B-32')", "model.name"):
        assert needle in str(err.value), needle


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_adapter("m2ib-tiny-vit", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_the_weights_digest_is_remembered_until_a_weight_changes(monkeypatch):
    """Hashed once per model; a weight changed in place, a replaced tensor or a copy is hashed again."""
    import hashlib as real_hashlib
    from m2ib.models import base
    adapter = load_adapter("m2ib-tiny-vit", pretrained=None, seed=0)
    calls = []

    class Counting:
        def sha256(self):
            calls.append(1)
            return real_hashlib.sha256()
    monkeypatch.setattr(base, "hashlib", Counting())
    first = adapter.weights_digest()
    assert adapter.weights_digest() == first and len(calls) == 1          # remembered
    copy = adapter.copy()
    assert copy.weights_digest() == first and len(calls) == 2             # same values, hashed anew
    with torch.no_grad():
        next(copy.model.parameters()).add_(1e-3)                          # in place (as randomisation, fine-tuning)
    changed = copy.weights_digest()
    assert changed != first and len(calls) == 3 and adapter.weights_digest() == first
    param = next(copy.model.parameters())
    param.data = param.data.clone()                                       # same values, a new tensor
    assert copy.weights_digest() == changed and len(calls) == 4
