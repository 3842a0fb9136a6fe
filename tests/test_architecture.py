"""The spine: import direction between layers, one seed rule (explain() equals a `scripts/run.py` run),
defaults that work on every configured model, and a metric added as one module + one YAML."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from m2ib.api import explain
from m2ib.core.attributor import get_method
from m2ib.core.errors import ModelUnavailableError
from m2ib.data.embedded import load_embedded_split
from m2ib.models.sources import M2IB_SETTINGS, load_adapter
from m2ib.pipeline.cache import AttributionCache
from m2ib.pipeline.experiment import build_adapter

ROOT = Path(__file__).resolve().parents[1]

#: layer -> the layers it may import from (core <- models/data <- {method, baselines, metrics} <- pipeline <- api <- cli;
#: data, with its downloaders (m2ib.download), imports only core).
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "data": {"core", "data"},
    "method": {"core", "models", "data", "method"},   # data: M2IB's "iba" mode estimates layer statistics
    "baselines": {"core", "models", "baselines"},
    "metrics": {"core", "models", "metrics"},
    "pipeline": {"core", "models", "data", "method", "baselines", "metrics", "pipeline"},
    "api": {"core", "models", "data", "method", "pipeline"},
    "cli": {"core", "models", "data", "method", "baselines", "metrics", "pipeline", "api", "cli"},
    "package": {"api", "models"},      # m2ib.explain / m2ib.load_adapter, imported lazily on first use
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in ("baselines", "metrics"):
        return parts[0]
    if parts[0] != "m2ib":
        return None
    if len(parts) == 1:
        return "package"
    return {"download": "data"}.get(parts[1], parts[1])


def our_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module == "m2ib"}
    return {n for n in names if layer_of(n) is not None}


def test_imports_point_down_the_layers():
    files = [p for d in ("m2ib", "baselines", "metrics") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 40
    bad = []
    for path in files:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        assert own in ALLOWED, f"{module}: no layer"
        for name in our_imports(path):
            if layer_of(name) not in ALLOWED[own]:
                bad.append(f"{module} ({own}) imports {name} ({layer_of(name)})")
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from m2ib.pipeline.experiment import run_experiment\nimport metrics\n")
    assert {layer_of(n) for n in our_imports(bad)} == {"pipeline", "metrics"}
    assert not {"pipeline", "metrics"} & ALLOWED["core"]


def test_scripts_import_the_installed_packages():
    for script in (ROOT / "scripts").glob("*.py"):
        assert "sys.path" not in script.read_text(), script.name


def test_explain_equals_a_scripts_run_py_run(tmp_path):
    """Same pairs (ids), seed and hyperparameters -> the same maps from the CLI and the Python API (same
    thread count: float sums are ordered by the thread split)."""
    hp = {"m2ib": {"steps": 3, "copies": 2}, "rise": {"n_masks": 40}}
    cmd = [sys.executable, str(ROOT / "scripts" / "run.py"), "model=tiny", "data=embedded", "data.limit=3",
           "method=[m2ib,rise,random]", "metric=[localisation]", "seed=7", "batch_size=2", "threads=1",
           f"cache_dir={tmp_path / 'cache'}", "write_results=false", "figures=false", "progress=false",
           f"hydra.run.dir={tmp_path / 'run'}"]
    cmd += [f"method.{m}.{k}={v}" for m, params in hp.items() for k, v in params.items()]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = load_adapter("m2ib-tiny-vit")
    samples = load_embedded_split("test", limit=3, progress=False)
    identity = build_adapter({"name": "m2ib-tiny-vit", "pretrained": None}, "cpu")[1]   # the pipeline's cache key
    for method in ("m2ib", "rise", "random"):
        attributor = get_method(method, adapter, **hp.get(method, {}))
        cached = AttributionCache(tmp_path / "cache", method,
                                  {"model": identity, "params": attributor.identity(), "seed": 7}).get(samples)
        api = explain(adapter, [s.image for s in samples], [s.caption for s in samples], method,
                      ids=[s.id for s in samples], seed=7, batch_size=2, **hp.get(method, {}))
        assert torch.equal(cached.image, api.image), method
        assert torch.equal(cached.text, api.text[:, :cached.text.shape[1]]), method
    other = explain(adapter, [s.image for s in samples], [s.caption for s in samples], "random", seed=7)
    assert not torch.equal(other.image, api.image)      # the ids are part of the rule


MODEL_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
#: Model configs whose weights are downloads (refused offline with the download message).
NEED_DOWNLOAD = {"biomedclip", "eva02_b16", "hf_clip_vit_b32", "local_checkpoint", "rn50_openai", "vit_b16_openai",
                 "vit_b16_siglip", "vit_b32_openai", "vit_l14_openai"}


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_explain_with_defaults_works_on_every_configured_model(config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{config}.yaml"))
    if config in NEED_DOWNLOAD:
        with pytest.raises(ModelUnavailableError, match="model.pretrained|model.name"):
            load_adapter(cfg["name"], cfg["pretrained"] if "${" not in str(cfg["pretrained"]) else "/no/such.pt")
        return
    adapter = load_adapter(cfg["name"], cfg["pretrained"])
    samples = load_embedded_split("test", limit=2, progress=False)
    att = explain(adapter, [s.image for s in samples], [s.caption for s in samples])
    assert att.image.shape == (2, *adapter.image_size) and torch.isfinite(att.text).all()


def test_published_m2ib_settings_fit_their_architectures():
    import open_clip
    for name, settings in M2IB_SETTINGS.items():
        if name.startswith(("hf-hub:", "hf:")):
            continue   # its config is a download; BiomedCLIP and CLIP ViT-B/32 have 12 + 12 blocks
        cfg = open_clip.get_model_config(name) or {}
        blocks = {"image": cfg["vision_cfg"]["layers"], "text": cfg["text_cfg"]["layers"]}
        for m in ("image", "text"):
            assert 0 <= settings[f"{m}_layer"] <= blocks[m] - 2, (name, m)


def test_a_metric_is_one_module_plus_one_yaml(tmp_path):
    importlib.import_module("example_metric")   # the module: registers 'example_peak'
    (tmp_path / "metric").mkdir()
    (tmp_path / "metric" / "example_peak.yaml").write_text("example_peak:\n  scale: 2.0\n")   # the YAML
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "model=tiny", "data.limit=2",
                                           "method=[random]", "metric=[localisation,example_peak]"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), write_results=False, figures=False, progress=False)
    from m2ib.pipeline.experiment import run_experiment
    table = run_experiment(cfg, run_dir=tmp_path / "run")["table"]
    image = table[table.modality == "image"].iloc[0]
    assert 0 < image["peak"] <= 2.0 and image["iou"] >= 0 and "peak_ci_low" in table.columns
