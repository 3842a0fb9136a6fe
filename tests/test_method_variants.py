"""Method variants (`<method>-<label>`): one run holds a method several times with different
hyperparameters; rows and tables carry the label, the cache is shared with the plain method."""
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from m2ib.core.attributor import METHODS, get_method, registered_name
from m2ib.core.errors import InputError
from m2ib.core.figures import hparam_text
from m2ib.core.records import Sample
from m2ib.pipeline.compute import compute_attributions

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = dict(image_layer=1, text_layer=1, steps=2, copies=2)


@pytest.mark.parametrize("entry, name", [("m2ib", "m2ib"), ("m2ib-iba", "m2ib"), ("m2ib-paper_var0.25", "m2ib"),
                                         ("m2ib_readout", "m2ib_readout"), ("m2ib_readout-wide", "m2ib_readout"),
                                         ("rise-a-b", None), ("m2ib-", None), ("nope-iba", None), ("m2ib-x y", None)])
def test_an_entry_names_a_registered_method_or_a_variant_of_one(entry, name):
    if name is None:
        with pytest.raises(InputError, match=r"unknown method .*<method>-<label>, e\.g\. m2ib-iba"):
            registered_name(entry)
    else:
        assert registered_name(entry) == name


def test_method_yaml_equals_the_methods_own_defaults(tiny_adapter):
    """A variant gets the method's Python defaults (Hydra composes no YAML for it), so every
    conf/method/*.yaml must resolve to exactly those."""
    for path in sorted((CONF / "method").glob("*.yaml")):
        name = path.stem
        params = yaml.safe_load(path.read_text())[name]
        cls = METHODS.get(name)
        if cls.fitted_to_weights:    # the readout needs training before construction; its hparams are its identity
            assert cls.check_params(params) == cls.check_params({}), name
            continue
        assert get_method(name, tiny_adapter, **params).identity() == get_method(name, tiny_adapter).identity(), name


def test_a_variant_is_labelled_by_its_entry_and_shares_the_plain_methods_cache(tiny_adapter, pairs, tmp_path):
    images, captions = pairs
    samples = [Sample(id=f"s{i}", image=im, caption=c) for i, (im, c) in enumerate(zip(images, captions))]
    plain = compute_attributions(get_method("m2ib", tiny_adapter, mode="paper", var=4.0, **FAST), samples, tmp_path,
                                 {"m": 1}, progress=False)
    variant = get_method("m2ib-wide", tiny_adapter, mode="paper", var=4.0, **FAST)
    assert variant.name == "m2ib" and variant.label == "m2ib-wide"
    again = compute_attributions(variant, samples, tmp_path, {"m": 1}, progress=False)
    assert len(list(tmp_path.iterdir())) == 1          # one cache folder: same method, same resolved settings
    assert plain.method == "m2ib" and again.method == "m2ib-wide"
    assert torch.equal(plain.image, again.image) and torch.equal(plain.text, again.text)
    fresh = variant.attribute(tiny_adapter.preprocess(images[:1]), tiny_adapter.tokenize(captions[:1]), [0])
    assert fresh.method == "m2ib-wide"


def test_a_run_holds_a_method_and_its_variants_as_separate_rows(tmp_path):
    from m2ib.pipeline.experiment import run_experiment
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "data.limit=2", "method=[m2ib]", "metric=[localisation]",
                                           *(f"method.m2ib.{k}={v}" for k, v in FAST.items()),
                                           *(f"+method.m2ib-paper.{k}={v}" for k, v in FAST.items()),
                                           "+method.m2ib-paper.mode=paper", "+method.m2ib-paper.var=4.0"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), progress=False,
               report={"enabled": False})
    result = run_experiment(cfg)
    assert set(result["table"]["method"]) == {"m2ib", "m2ib-paper"}
    rows = result["rows"].set_index(["method", "modality", "sample_id"]).sort_index()
    assert not rows.loc["m2ib"].equals(rows.loc["m2ib-paper"])   # var 4 gives other maps, so other scores


def test_a_bad_variant_is_refused_before_any_model(tmp_path, monkeypatch):
    from m2ib.pipeline import experiment
    monkeypatch.setattr(experiment, "build", lambda *a, **k: pytest.fail("a model was loaded"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "+method.m2ib-iba.mode=ibba"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(cache_dir=str(tmp_path), results_dir=str(tmp_path), progress=False)
    with pytest.raises(InputError, match="mode must be one of"):
        experiment.run_experiment(cfg)


def test_hyperparameter_text_shows_layer_lists():
    assert hparam_text({"image_layers": [0, 1, 2], "mode": "iba"}) == "image_layers=0+1+2, mode=iba"
