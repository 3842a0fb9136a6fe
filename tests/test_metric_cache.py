"""The metric-rows cache: exact round trip, a re-run scores nothing again, an interrupted run resumes
after the last finished metric, damaged files are rescored."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from m2ib.core.metric import METRICS
from m2ib.core.records import Sample
from m2ib.pipeline.metric_cache import MetricRowsCache, _decode, _encode
from m2ib.pipeline.provenance import data_fingerprint

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_rows_round_trip_exactly(tmp_path, pairs):
    rows = pd.DataFrame({"sample_id": ["a", "001", "c"], "method": "m2ib-x", "threshold": ["mean", None, "top"],
                         "modality": ["image", "text", "image"],
                         "iou": [0.1 + 0.2, np.nan, 1 / 3], "n": np.array([1, 2, 3], dtype=np.int64),
                         "hit": [True, False, True], "curve": [np.linspace(0, 1, 5, dtype=np.float32),
                                                              np.zeros(2, np.float32), np.ones(7, np.float32)]})
    samples = [Sample(id="a", image=pairs[0][0], caption="x")]
    cache = MetricRowsCache(tmp_path, "m2ib-key", "m2ib-x", "road", {"k": 1}, data_fingerprint(samples))
    cache.put(rows, seconds=2.5)
    back, seconds = cache.get()
    assert seconds == 2.5
    for column in rows.columns:
        if column == "curve":
            for a, b in zip(rows[column], back[column]):
                assert a.dtype == b.dtype and np.array_equal(a, b)
        else:
            pd.testing.assert_series_equal(rows[column], back[column], check_exact=True)   # values and dtype
    assert list(back["sample_id"]) == ["a", "001", "c"]           # ids stay strings
    assert back["threshold"].isna().tolist() == [False, True, False]
    assert _encode(pd.DataFrame({"x": [object()]})) is None       # not cacheable: simply rescored
    other = MetricRowsCache(tmp_path, "m2ib-key", "m2ib", "road", {"k": 1}, data_fingerprint(samples))
    assert other.path != cache.path                               # a variant's rows never serve the plain method


def _cfg(tmp_path, *extra):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "data.limit=3", "method=[random,saliency]",
                                           "metric=[localisation,confidence]", *extra])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "results"), progress=False,
               figures=False, report={"enabled": False})
    return cfg


class Stop(Exception):
    pass


def test_a_rerun_scores_nothing_again_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    from m2ib.pipeline.experiment import run_experiment
    calls = []
    for name in ("localisation", "confidence"):
        spec = METRICS.get(name)

        def counting(*args, _score=spec.score, _name=name, **kwargs):
            calls.append((args[0].method, _name))
            if (args[0].method, _name) == ("saliency", "confidence") and stop:
                raise Stop                                   # killed while scoring the last (method, metric)
            return _score(*args, **kwargs)
        monkeypatch.setattr(spec, "score", counting)
    stop = True
    with pytest.raises(Stop):
        run_experiment(_cfg(tmp_path))
    assert calls == [("random", "localisation"), ("random", "confidence"), ("saliency", "localisation"),
                     ("saliency", "confidence")]
    calls.clear()
    stop = False
    first = run_experiment(_cfg(tmp_path))
    assert calls == [("saliency", "confidence")]                # only what was not finished
    calls.clear()
    again = run_experiment(_cfg(tmp_path))
    assert calls == []
    pd.testing.assert_frame_equal(first["table"], again["table"], check_exact=True)
    fresh = run_experiment(_cfg(tmp_path, "results_dir=" + str(tmp_path / "fresh")) | {"cache_dir": str(tmp_path / "c2")})
    pd.testing.assert_frame_equal(first["table"], fresh["table"], check_exact=True)
    pd.testing.assert_frame_equal(first["rows"], fresh["rows"], check_exact=True)


def test_a_damaged_file_is_reported_deleted_and_rescored(tmp_path, pairs, caplog):
    samples = [Sample(id="a", image=pairs[0][0], caption="x")]
    cache = MetricRowsCache(tmp_path, "k", "m", "iou", {}, data_fingerprint(samples))
    cache.put(pd.DataFrame({"sample_id": ["a"], "iou": [0.5]}), 1.0)
    cache.path.write_bytes(cache.path.read_bytes()[:40])
    with caplog.at_level("WARNING"):
        assert cache.get() is None
    assert "damaged metric rows" in caplog.text and not cache.path.exists()
    with pytest.raises(ValueError):
        arrays = _encode(pd.DataFrame({"c": [np.zeros(3)]}))
        arrays["c0_lengths"] = np.array([5])
        np.savez(tmp_path / "bad.npz", **arrays, __seconds__=np.array(1.0))
        _decode(tmp_path / "bad.npz")


def test_every_metrics_rows_are_cacheable(tmp_path):
    """Each registered metric's rows fit the file format (else a re-run would silently rescore it)."""
    from m2ib.pipeline.experiment import run_experiment
    names = [n for n in METRICS.names() if METRICS.get(n).score.__module__.startswith("metrics.")]
    assert {"confidence", "localisation", "roar", "road", "sanity", "degradation"} <= set(names)
    cfg = _cfg(tmp_path, "method=[random]", f"metric=[{','.join(names)}]", "metric.sanity.encoders=[image]",
               "metric.roar.epochs=1", "data.limit=4", "metric.roar.finetune_fraction=0.5")
    run_experiment(cfg)
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "metric-rows").glob("*.npz"))
    assert cached == sorted(names)
