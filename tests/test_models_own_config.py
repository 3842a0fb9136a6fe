"""A user's own architecture: an open_clip JSON config plus a checkpoint, through the Python API and the CLI;
one-line errors for a checkpoint that does not fit, a bad or clashing JSON and an unknown model name."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError, ModelUnavailableError
from m2ib.models.sources import load_adapter

ROOT = Path(__file__).resolve().parents[1]
#: An in-house CLIP: a ModifiedResNet image tower and a 2-block text transformer (names nothing built in).
OWN_CONFIG = {"embed_dim": 24,
              "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """(JSON path, checkpoint path, the adapter the checkpoint was saved from)."""
    root = tmp_path_factory.mktemp("own")
    cfg = root / "m2ib-test-inhouse-clip.json"
    cfg.write_text(json.dumps(OWN_CONFIG), encoding="utf-8")
    trained = load_adapter(str(cfg), pretrained=None, seed=5)
    ckpt = root / "inhouse.pt"
    torch.save(trained.state_dict(), ckpt)
    return cfg, ckpt, trained


def _inputs(adapter):
    rng = np.random.default_rng(0)
    px = adapter.preprocess([Image.fromarray(rng.integers(0, 255, (70, 64, 3), dtype=np.uint8))])
    return px, adapter.tokenize(["a red circle"])


def test_json_config_and_checkpoint_through_the_api(own):
    cfg, ckpt, trained = own
    loaded = load_adapter(str(cfg), pretrained=str(ckpt), seed=0)
    assert loaded.family == "open_clip_resnet" and loaded.name == str(cfg)
    assert loaded.source.identity()["name"] == str(cfg) and loaded.weights_digest() == trained.weights_digest()
    px, tb = _inputs(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(px), trained.encode_image(px))
        assert torch.equal(loaded.encode_text(tb), trained.encode_text(tb))
        assert not torch.equal(load_adapter(str(cfg), seed=0).encode_image(px), trained.encode_image(px))


@pytest.mark.parametrize("spoil, expect", [
    (lambda sd: {k: v for k, v in sd.items() if k != "visual.attnpool.c_proj.bias"},
     "1 missing keys (first: visual.attnpool.c_proj.bias)"),
    (lambda sd: {**sd, "visual.extra_head.weight": torch.zeros(2)}, "1 unexpected keys (first: visual.extra_head.weight)"),
    (lambda sd: {**sd, "text_projection": torch.zeros(32, 7)}, "1 keys of another shape (first: text_projection)"),
])
def test_checkpoint_that_does_not_fit_fails_with_one_line(own, tmp_path, spoil, expect):
    cfg, ckpt, _ = own
    bad = tmp_path / "bad.pt"
    torch.save(spoil(torch.load(ckpt, weights_only=True)), bad)
    with pytest.raises(InputError) as err:
        load_adapter(str(cfg), pretrained=str(bad))
    msg = str(err.value)
    assert "\n" not in msg and expect in msg and str(cfg) in msg and str(bad) in msg and "Fix: set model.name" in msg


def test_checkpoint_of_another_architecture(own, tmp_path):
    cfg, _, _ = own
    vit = tmp_path / "vit.pt"
    torch.save(load_adapter("m2ib-tiny-vit").state_dict(), vit)
    with pytest.raises(InputError) as err:
        load_adapter(str(cfg), pretrained=str(vit))
    msg = str(err.value)
    assert "\n" not in msg and "missing keys (first: visual.bn1.weight" in msg \
        and "unexpected keys (first: visual.class_embedding" in msg and "keys of another shape" in msg


def test_bad_json_configs(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_adapter(str(tmp_path / "nowhere.json"))
    broken = tmp_path / "m2ib-test-broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="cannot read the JSON config"):
        load_adapter(str(broken))
    hub_style = tmp_path / "m2ib-test-hub-style.json"
    hub_style.write_text(json.dumps({"model_cfg": OWN_CONFIG}), encoding="utf-8")
    with pytest.raises(InputError, match="local-dir:"):
        load_adapter(str(hub_style))
    clash = tmp_path / "RN50.json"
    clash.write_text(json.dumps(OWN_CONFIG), encoding="utf-8")
    with pytest.raises(InputError, match="rename the JSON file"):
        load_adapter(str(clash))


def test_unknown_name_says_what_is_available():
    with pytest.raises(InputError) as err:
        load_adapter("RN5O")
    msg = str(err.value)
    assert "\n" not in msg and "did you mean" in msg and "'RN50'" in msg
    for needle in ("m2ib-tiny-vit", "m2ib-tiny-resnet", "open_clip.list_models()", "hf-hub:", "local-dir:",
                   "JSON config", "model.pretrained"):
        assert needle in msg, needle


def test_json_config_and_checkpoint_through_the_cli(own, tmp_path):
    """scripts/run.py model=local_checkpoint with model.name = the JSON path, on 2 embedded pairs."""
    cfg, ckpt, _ = own
    cmd = [sys.executable, str(ROOT / "scripts" / "run.py"), "model=local_checkpoint", f"model.name={cfg}",
           f"model.pretrained={ckpt}", "model.m2ib.image_layer=3", "model.m2ib.text_layer=0", "data.limit=2",
           "method=[m2ib]", "method.m2ib.steps=2", "method.m2ib.copies=2", "metric=[confidence]",
           f"cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}", "figures=false",
           "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "m2ib" in done.stdout and "written:" in done.stdout
    tables = list((tmp_path / "results").rglob("*.csv"))
    assert tables and tables[0].name.startswith("custom-m2ib-test-inhouse-clip-embedded-test-n2-")


def test_a_json_configs_cache_identity_covers_its_content(own, tmp_path):
    """The attribution cache keys a JSON-config model by the config's content, not only its path."""
    import hashlib
    from m2ib.models.sources import resolve
    cfg = own[0]
    identity = resolve(str(cfg), None).identity()
    assert identity["config_sha256"] == hashlib.sha256(json.dumps(OWN_CONFIG, sort_keys=True).encode()).hexdigest()
    wider = tmp_path / "m2ib-test-inhouse-clip-wider.json"
    wider.write_text(json.dumps({**OWN_CONFIG, "embed_dim": 32}), encoding="utf-8")
    assert resolve(str(wider), None).identity()["config_sha256"] != identity["config_sha256"]
    assert "config_sha256" not in resolve("m2ib-tiny-vit", None).identity()     # built-in names: unchanged keys
