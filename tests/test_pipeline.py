"""Runs: every config preset composes, cached runs resume after an interruption without recomputing,
tables aggregate correctly, and the regression comparison reports moved cells."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from m2ib.core.attributor import get_method
from m2ib.core.errors import InputError
from m2ib.method import M2IBAttributor
from m2ib.pipeline.cache import AttributionCache
from m2ib.pipeline.compute import compute_attributions
from m2ib.pipeline.experiment import validate_config
from m2ib.pipeline.regression import compare_tables, format_drift
from m2ib.pipeline.tables import aggregate, bootstrap_ci
from m2ib.core.records import Sample

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def _compose(overrides, hydra_node=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_node)


class Interrupted(Exception):
    """Stands in for Ctrl-C (pytest itself stops on a real KeyboardInterrupt)."""


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_model_and_data(experiment):
    for model in MODELS:
        for data in DATA:
            cfg = _compose([f"experiment={experiment}", f"model={model}", f"data={data}"])
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert resolved["experiment_name"] == experiment
            assert resolved["method"] and resolved["metric"]
            validate_config(resolved)      # every method's, metric's and data set's keys and types


@pytest.mark.parametrize("launcher, target", [("basic", "BasicLauncher"), ("joblib", "JoblibLauncher"),
                                              ("local_parallel", "JoblibLauncher"),
                                              ("submitit_slurm", "SlurmLauncher"), ("cluster", "SlurmLauncher")])
def test_launchers_compose(launcher, target):
    cfg = _compose([f"hydra/launcher={launcher}", "experiment=table1"], hydra_node=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_method_configs_are_accepted_by_their_methods(tiny_adapter):
    cfg = OmegaConf.to_container(_compose(["experiment=table1", "model=tiny"]), resolve=True)
    assert len(cfg["method"]) == 17
    for name, params in cfg["method"].items():
        assert get_method(name, tiny_adapter, **params).name == name


@pytest.fixture()
def samples(pairs):
    images, captions = pairs
    return [Sample(id=f"s{i}", image=im, caption=c) for i, (im, c) in enumerate(zip(images * 2, captions * 2))]


def test_interrupted_run_resumes_without_recomputing(tiny_adapter, samples, tmp_path, monkeypatch):
    params = dict(layer=1, steps=2, copies=2)
    calls, interrupted = [], []
    original = M2IBAttributor.attribute

    def flaky(self, pixels, text, seeds):
        calls.append(len(seeds))
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            raise Interrupted                # e.g. Ctrl-C or a killed job during the second batch
        return original(self, pixels, text, seeds)

    monkeypatch.setattr(M2IBAttributor, "attribute", flaky)
    with pytest.raises(Interrupted):
        compute_attributions(get_method("m2ib", tiny_adapter, **params), samples, tmp_path, {"m": 1}, batch_size=2, progress=False)
    cache = AttributionCache(tmp_path, "m2ib", {"model": {"m": 1}, "params": get_method("m2ib", tiny_adapter, **params).identity(), "seed": 0})
    assert len(cache.missing(samples)) == 4                           # first batch of 2 was kept
    calls.clear()
    resumed = compute_attributions(get_method("m2ib", tiny_adapter, **params), samples, tmp_path, {"m": 1}, batch_size=2,
                                   progress=False)
    assert calls == [2, 2]                                            # only the 4 missing pairs
    monkeypatch.setattr(M2IBAttributor, "attribute", original)
    fresh = compute_attributions(get_method("m2ib", tiny_adapter, **params), samples, tmp_path / "fresh", {"m": 1},
                                 batch_size=2, progress=False)
    assert torch.equal(resumed.image, fresh.image) and torch.equal(resumed.text, fresh.text)
    # Other batch sizes change float32 summation order only (pair seeds come from sample ids).
    other = compute_attributions(get_method("m2ib", tiny_adapter, **params), samples, tmp_path / "other", {"m": 1},
                                 batch_size=3, progress=False)
    torch.testing.assert_close(other.image, fresh.image, rtol=1e-3, atol=1e-3)


def test_cache_never_returns_another_samples_map(tiny_adapter, samples, tmp_path):
    """Same id, other pixels (e.g. a re-downloaded subset): recomputed, not served from the cache.
    Ids that sanitise to the same file name ('a:1', 'a_1') get different files."""
    params = dict(layer=1, steps=2, copies=2)
    first = compute_attributions(get_method("m2ib", tiny_adapter, **params), samples[:1], tmp_path, {"m": 1}, progress=False)
    changed = [Sample(id=samples[0].id, image=samples[1].image, caption=samples[0].caption)]
    again = compute_attributions(get_method("m2ib", tiny_adapter, **params), changed, tmp_path, {"m": 1}, progress=False)
    fresh = compute_attributions(get_method("m2ib", tiny_adapter, **params), changed, tmp_path / "fresh", {"m": 1}, progress=False)
    assert not torch.equal(first.image, again.image) and torch.equal(again.image, fresh.image)
    cache = AttributionCache(tmp_path, "m2ib", {"model": {"m": 1}, "params": get_method("m2ib", tiny_adapter, **params).identity(), "seed": 0})
    assert cache.path("a:1") != cache.path("a_1")


def test_cache_key_separates_hyperparameters(tiny_adapter, samples, tmp_path):
    a = compute_attributions(get_method("m2ib", tiny_adapter, **dict(layer=1, steps=2, copies=2, beta=0.1)), samples[:2],
                             tmp_path, {"m": 1}, progress=False)
    b = compute_attributions(get_method("m2ib", tiny_adapter, **dict(layer=1, steps=2, copies=2, beta=10.0)), samples[:2],
                             tmp_path, {"m": 1}, progress=False)
    assert len(list(tmp_path.iterdir())) == 2 and not torch.equal(a.image, b.image)


def test_aggregate_mean_and_bootstrap_interval():
    rows = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 2, "modality": "image",
                         "iou": [0.0, 1.0, 0.5, 0.5, 0.2, np.nan]})
    table = aggregate(rows, ["method", "modality"], ["iou"], seed=0)
    a, b = table.iloc[0], table.iloc[1]
    assert a["n"] == 4 and a["iou"] == pytest.approx(0.5)
    assert 0.0 <= a["iou_ci_low"] < 0.5 < a["iou_ci_high"] <= 1.0
    assert b["iou"] == pytest.approx(0.2) and b["iou_ci_low"] == b["iou_ci_high"] == pytest.approx(0.2)
    assert bootstrap_ci(np.array([1.0, 2.0, 3.0]), seed=1) == bootstrap_ci(np.array([1.0, 2.0, 3.0]), seed=1)


def test_compare_tables_reports_moved_missing_and_nan_cells():
    ref = pd.DataFrame({"method": ["a", "b"], "modality": ["image", "image"], "iou": [0.5, 0.2], "drop": [1.0, np.nan]})
    same = ref.copy()
    same.loc[0, "iou"] += 1e-4
    assert compare_tables(same, ref, ["method", "modality"], ["iou", "drop"], atol=1e-3, rtol=0).empty
    moved = ref.copy()
    moved.loc[0, "iou"] = 0.6
    moved.loc[1, "drop"] = 2.0
    drift = compare_tables(moved.iloc[[0, 1]], ref, ["method", "modality"], ["iou", "drop"], atol=1e-3, rtol=0)
    assert sorted(zip(drift["method"], drift["column"])) == [("a", "iou"), ("b", "drop")]
    assert "reference" in format_drift(drift, 1e-3, 0) and "0.6" in format_drift(drift, 1e-3, 0)
    missing = compare_tables(ref.iloc[[0]], ref, ["method", "modality"], ["iou"], atol=1e-3, rtol=0)
    assert list(missing["method"]) == ["b"]


def test_sanity_experiment_runs_methods_with_their_own_batch_size(tiny_adapter, tmp_path):
    """A method hyperparameter called batch_size must reach the method, not clash with the runner's."""
    cfg = OmegaConf.to_container(_compose(["experiment=sanity", "model=tiny", "data.limit=2",
                                           "method=[integrated_gradients]", "method.integrated_gradients.n_steps=2",
                                           "method.integrated_gradients.batch_size=3",
                                           "metric.sanity.encoders=[image]"]), resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), progress=False)
    from m2ib.pipeline.experiment import run_experiment
    result = run_experiment(cfg)
    rows = result["sanity"]["rows"]
    assert set(rows["method"]) == {"integrated_gradients"} and set(rows["encoder"]) == {"image"}
    assert rows["spearman"].notna().any()
    assert (tmp_path / "results" / "sanity").is_dir() and result["paths"]["sanity_spearman_curve"].is_file()


def test_shards_partition_the_data_and_merge_into_one_table(tmp_path):
    """Two shards of one run cover every pair once; merging them equals the unsharded table."""
    import subprocess
    import sys
    from m2ib.pipeline.experiment import run_experiment
    base = ["model=tiny", "data.limit=4", "method=[random]", "metric=[localisation]"]
    results = {}
    for extra in (["data.num_shards=1"], ["data.shard=0", "data.num_shards=2"], ["data.shard=1", "data.num_shards=2"]):
        cfg = OmegaConf.to_container(_compose(base + extra), resolve=True)
        cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), progress=False,
                   figures=False)
        results[extra[-1] + extra[0]] = run_experiment(cfg)
    whole = results["data.num_shards=1data.num_shards=1"]
    ids = [set(r["rows"]["sample_id"]) for k, r in results.items() if "=2" in k]
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(whole["rows"]["sample_id"])
    stem = Path(str(whole["paths"]["csv"])[: -len(".csv")])      # shards share the unsharded stem
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "merge_shards.py"),
                           str(stem)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged = pd.read_csv(f"{stem}.csv")
    pd.testing.assert_frame_equal(merged.sort_values("modality").reset_index(drop=True)[["method", "modality", "n", "iou"]],
                                  whole["table"].sort_values("modality").reset_index(drop=True)[["method", "modality", "n", "iou"]],
                                  check_dtype=False)


@pytest.mark.parametrize("override, match", [
    ("method.m2ib.image_beta=abc", "m2ib image: beta must be a number, got .abc."),
    ("method.m2ib.image_beta=nan", "m2ib image: beta must be finite"),
    ("+metric.confidence.quantil=0.3", r"metric 'confidence': unknown parameter\(s\) \['quantil'\]"),
    ("method.rise.n_masks=0", "n_masks must be a positive integer"),
    ("+data.colour=red", r"data set 'embedded': unknown key\(s\) \['colour'\]"),
    ("model.finetune_lr=abc", "model config: parameter finetune_lr must be a number"),
    ("+model.m2ib.image_layr=1", r"model.m2ib: unknown parameter\(s\) \['image_layr'\]"),
    ("+model.m2ib=5", "model.m2ib must be a mapping"),
    ("metric=[roar] data.num_shards=2", "needs the whole data set"),
    ("data.shard=2 data.num_shards=2", "data.shard must be in 0..num_shards-1"),
])
def test_bad_settings_are_refused_before_any_model_or_data_is_loaded(override, match, monkeypatch, tmp_path):
    from m2ib.pipeline import experiment

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")
    monkeypatch.setattr(experiment, "build", never)
    monkeypatch.setattr(experiment, "load_dataset", never)
    cfg = OmegaConf.to_container(_compose(["experiment=table1", "model=tiny", *override.split()]), resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), progress=False)
    with pytest.raises(InputError, match=match):
        experiment.run_experiment(cfg)
