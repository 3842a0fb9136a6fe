"""CI regression on metric values: recompute the fixed embedded subset (experiment=regression: every
registered method, confidence and localisation) and compare every table cell (means, interval bounds,
counts) with the committed reference in results/regression/, within the tolerances stated (with the
measured drift they come from) in conf/experiment/regression.yaml.

The other tests make deliberate changes (a method's map, the bootstrap level, M2IB's beta, a metric's
definition), recompute the affected methods on the same pairs (a fresh cache each, so monkeypatched
maps are really recomputed) and show that the comparison with the committed reference flags each of
them; and that reordering a table's rows or columns is not drift while each kind of drift is."""
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import metrics.localisation
from baselines.attention import GenericAttentionRelevance
from m2ib.core.attributor import available_methods
from m2ib.core.metric import table_columns
from m2ib.models.embedded import M2IB_SETTINGS
from m2ib.pipeline import tables
from m2ib.pipeline.experiment import GROUP_BY, run_experiment, table_stem
from m2ib.pipeline.regression import BOUNDS, CELL_PROBLEMS, check_against_reference, compare_tables, format_drift

ROOT = Path(__file__).resolve().parents[1]

#: Registered methods that need a trained artifact before they can run, left out of the CI regression set
#: on purpose: m2ib_readout needs `make readout` (the embedded training split, ~5 min to generate, plus
#: ~1 min of training); tests/test_readout.py covers it on a readout trained in the test.
NEEDS_TRAINING = {"m2ib_readout"}


def regression_config(tmp_path, overrides=(), methods=None):
    """The composed regression config, writing nothing, with an empty cache under tmp_path (so every
    map is recomputed); `methods` keeps only those methods (a `method=[...]` override would not: the
    experiment's own method settings add theirs back)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=regression", *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    if methods is not None:
        cfg["method"] = {name: cfg["method"][name] for name in methods}
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), progress=False,
               write_results=False, figures=False)
    return cfg


def reference_csv(cfg) -> Path:
    return ROOT / "results" / "regression" / f"{table_stem(cfg, cfg['data']['limit'])}.csv"


def values(cfg):
    return table_columns(cfg["metric"])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(config, result) of one fresh run of the whole regression experiment (~15 s on 2 cores; only the
    main test uses it, so that the two xdist workers do not both compute it)."""
    cfg = regression_config(tmp_path_factory.mktemp("regression"))
    return cfg, run_experiment(cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(config of the whole experiment, the committed reference table)."""
    cfg = regression_config(tmp_path_factory.mktemp("reference"))
    return cfg, pd.read_csv(reference_csv(cfg))


def drift_from_reference(table, reference, methods=None):
    """compare_tables(table, committed reference [restricted to `methods`]) at the configured tolerances."""
    cfg, ref = reference
    if methods is not None:
        ref = ref[ref["method"].isin(methods)]
    tol = cfg["regression"]
    return compare_tables(table, ref, GROUP_BY, values(cfg), tol["atol"], tol["rtol"])


def test_metrics_match_committed_reference(fresh):
    cfg, result = fresh
    table = result["table"]
    assert set(table["method"]) == set(available_methods()) - NEEDS_TRAINING   # every other registered method
    for v in values(cfg):
        assert {v, f"{v}_ci_low", f"{v}_ci_high", f"{v}_n"} <= set(table.columns)
    tol = cfg["regression"]
    report = check_against_reference(table, reference_csv(cfg), GROUP_BY, values(cfg), tol["atol"], tol["rtol"])
    assert "no metric moved" in report


def test_a_changed_chefer_map_is_caught(reference, tmp_path, monkeypatch):
    original = GenericAttentionRelevance.relevance

    def transposed(self, attn, score):    # a deliberate bug: relevance read by column instead of by row
        return original(self, attn, score).transpose(-1, -2)

    monkeypatch.setattr(GenericAttentionRelevance, "relevance", transposed)
    result = run_experiment(regression_config(tmp_path, methods=["chefer"]))
    drift = drift_from_reference(result["table"], reference, methods=["chefer"])
    assert not drift.empty, "a transposed Chefer relevance was not flagged"
    assert set(drift["method"]) == {"chefer"} and set(drift["problem"]) <= set(CELL_PROBLEMS)
    assert "drop" in set(drift["column"])


def test_a_changed_bootstrap_level_is_caught(reference, monkeypatch):
    """Re-aggregates the reference's own per-pair rows (<stem>.rows.csv): unchanged they give the
    reference table back; with 90% instead of 95% intervals every metric's bounds are flagged."""
    cfg, _ = reference
    rows = pd.read_csv(reference_csv(cfg).with_suffix(".rows.csv"))
    assert drift_from_reference(tables.aggregate(rows, GROUP_BY, values(cfg), seed=cfg["seed"]), reference).empty
    monkeypatch.setattr(tables, "bootstrap_ci", functools.partial(tables.bootstrap_ci, level=0.90))
    drift = drift_from_reference(tables.aggregate(rows, GROUP_BY, values(cfg), seed=cfg["seed"]), reference)
    assert not drift.empty, "a 90% instead of 95% interval was not flagged"
    assert all(c.endswith(BOUNDS) for c in drift["column"])        # only the bounds moved, not the means
    flagged = {c.rsplit("_ci_", 1)[0] for c in drift["column"]}
    assert flagged == set(values(cfg))                             # every metric's interval is caught
    assert set(drift["method"]) == set(available_methods()) - NEEDS_TRAINING


def test_a_10_percent_change_of_m2ib_beta_is_caught(reference, tmp_path):
    image_beta, text_beta = 1.1 * M2IB_SETTINGS["image_beta"], 1.1 * M2IB_SETTINGS["text_beta"]
    cfg = regression_config(tmp_path, [f"method.m2ib.image_beta={image_beta}", f"method.m2ib.text_beta={text_beta}"],
                            methods=["m2ib"])
    result = run_experiment(cfg)
    drift = drift_from_reference(result["table"], reference, methods=["m2ib"])
    assert not drift.empty, "M2IB with beta x 1.1 was not flagged"
    assert set(drift["method"]) == {"m2ib"} and set(drift["problem"]) <= set(CELL_PROBLEMS)
    assert set(drift["modality"]) == {"image", "text"}            # both bottlenecks' betas changed


def test_a_changed_metric_definition_is_caught(reference, tmp_path, monkeypatch):
    top_k_region = metrics.localisation.top_k_region

    def pointing_game_top5(values, truth):   # a deliberate change: the 5 highest pixels, not the maximum
        top = top_k_region(values, 5)
        return float(np.logical_and(top, truth).sum() / top.sum())

    monkeypatch.setattr(metrics.localisation, "pointing_game", pointing_game_top5)
    methods = ["m2ib", "chefer"]
    result = run_experiment(regression_config(tmp_path, methods=methods))
    drift = drift_from_reference(result["table"], reference, methods=methods)
    assert not drift.empty, "a changed pointing game was not flagged"
    assert set(drift["column"]) <= {"pointing_game", "pointing_game_ci_low", "pointing_game_ci_high"}
    assert "pointing_game" in set(drift["column"])


def test_reordered_rows_and_columns_are_not_drift(reference):
    cfg, ref = reference
    tol = cfg["regression"]
    shuffled = ref.sample(frac=1.0, random_state=0)[list(reversed(ref.columns))]
    assert list(shuffled.index) != list(ref.index) and list(shuffled.columns) != list(ref.columns)
    assert compare_tables(shuffled, ref, GROUP_BY, values(cfg), tol["atol"], tol["rtol"]).empty
    moved = _shifted(shuffled, "drop_ci_high", 2.0, tol)    # one bound of the reordered table moved: caught
    drift = compare_tables(moved, ref, GROUP_BY, values(cfg), tol["atol"], tol["rtol"])
    assert list(drift["column"]) == ["drop_ci_high"]
    assert list(zip(drift["method"], drift["modality"])) == [tuple(shuffled.iloc[0][GROUP_BY])]


def _first_finite(ref, column):
    return ref.index[ref[column].notna()][0]


def _shifted(ref, column, times, tol):
    """ref with the first finite cell of `column` moved by `times` its tolerance."""
    out = ref.copy()
    i = _first_finite(ref, column)
    out.loc[i, column] += times * (tol["atol"] + tol["rtol"] * abs(ref.loc[i, column]))
    return out


CHANGES = {   # name: (change of the reference table, expected (column, problem) of the drift)
    "bound moved": (lambda ref, tol: _shifted(ref, "drop_ci_high", 2.0, tol), ("drop_ci_high", "moved")),
    "mean moved": (lambda ref, tol: _shifted(ref, "text_ap", -2.0, tol), ("text_ap", "moved")),
    "count changed": (lambda ref, tol: ref.assign(iou_n=ref["iou_n"] + (ref.index == _first_finite(ref, "iou"))),
                      ("iou_n", "changed")),
    "became NaN": (lambda ref, tol: ref.assign(text_ap=ref["text_ap"].where(ref.index != _first_finite(ref, "text_ap"))),
                   ("text_ap", "became NaN")),
    "no longer NaN": (lambda ref, tol: ref.assign(iou=ref["iou"].fillna(0.0)), ("iou", "no longer NaN")),
    "missing group": (lambda ref, tol: ref.iloc[1:], ("*", "missing group")),
    "extra group": (lambda ref, tol: pd.concat([ref, ref.iloc[[0]].assign(method="new")]), ("*", "extra group")),
    "missing column": (lambda ref, tol: ref.drop(columns=["increase_ci_low"]), ("increase_ci_low", "missing column")),
    "extra column": (lambda ref, tol: ref.assign(spare=1.0), ("spare", "extra column")),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_kind_of_drift_is_reported(reference, change):
    cfg, ref = reference
    tol = cfg["regression"]
    within = _shifted(_shifted(ref, "drop_ci_low", 0.5, tol), "relative_drop", -0.5, tol)
    assert compare_tables(within, ref, GROUP_BY, values(cfg), tol["atol"], tol["rtol"]).empty  # not drift
    alter, expected = CHANGES[change]
    drift = compare_tables(alter(ref, tol), ref, GROUP_BY, values(cfg), tol["atol"], tol["rtol"])
    assert not drift.empty and set(zip(drift["column"], drift["problem"])) == {expected}
    assert expected[1] in format_drift(drift, tol["atol"], tol["rtol"])
