"""CI regression on metric values: recompute the fixed embedded subset (experiment=regression) and
compare every table cell with the committed reference in results/regression/, within the tolerances
stated (with their reason) in conf/experiment/regression.yaml."""
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from m2ib.method import M2IBAttributor
from m2ib.pipeline.experiment import GROUP_BY, run_experiment, table_stem
from m2ib.pipeline.regression import check_against_reference
from m2ib.core.metric import METRICS

ROOT = Path(__file__).resolve().parents[1]


def regression_config(tmp_path, overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=regression", *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), progress=False,
               write_results=False, figures=False)
    return cfg


def reference_csv(cfg) -> Path:
    n = cfg["data"]["limit"]
    return ROOT / "results" / "regression" / f"{table_stem(cfg, n)}.csv"


def values(cfg):
    return [c for m in cfg["metric"] for c in METRICS.get(m).columns]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regression")
    cfg = regression_config(tmp)
    return cfg, run_experiment(cfg)


def test_metrics_match_committed_reference(fresh):
    cfg, result = fresh
    tol = cfg["regression"]
    report = check_against_reference(result["table"], reference_csv(cfg), GROUP_BY, values(cfg),
                                     tol["atol"], tol["rtol"])
    assert "no metric moved" in report


def test_a_perturbed_method_is_caught(fresh, tmp_path, monkeypatch):
    cfg, _ = fresh
    original = M2IBAttributor.attribute

    def flipped(self, pixels, text, seeds):     # a deliberate bug: the image map upside down
        att = original(self, pixels, text, seeds)
        att.image = torch.flip(att.image, dims=[1])
        return att

    monkeypatch.setattr(M2IBAttributor, "attribute", flipped)
    result = run_experiment(regression_config(tmp_path, ["method=[m2ib]"]))
    reference = pd.read_csv(reference_csv(cfg))
    m2ib_only = tmp_path / "reference-m2ib.csv"
    reference[reference["method"] == "m2ib"].to_csv(m2ib_only, index=False)
    tol = cfg["regression"]
    with pytest.raises(AssertionError) as err:
        check_against_reference(result["table"], m2ib_only, GROUP_BY, values(cfg), tol["atol"], tol["rtol"])
    message = str(err.value)
    assert "m2ib / image" in message and "iou" in message
    assert "m2ib / text" not in message          # the text side was not touched
