"""M2IB's estimator modes: 'paper' and 'iba' against plain restatements, the Welford statistics against
numpy, the statistics cache, and one-line refusals of bad settings."""
import numpy as np
import pytest
import torch

from m2ib.api import explain
from m2ib.core.errors import InputError
from m2ib.data.registry import load_dataset
from m2ib.method import M2IBAttributor, M2IBConfig
from m2ib.method import stats as stats_mod
from m2ib.method.reference import reference_pair
from m2ib.method.bottleneck import DEFAULT_STATS
from m2ib.method.stats import MIN_POSITION_COUNT, MIN_STD, Welford, estimate_stats, layer_stats

HP = dict(layer=1, steps=4, copies=3)
#: 12 captions: the first text positions are seen >= MIN_POSITION_COUNT (10) times, the last ones fewer,
#: so both the per-position statistics and the pooled fallback are exercised.
STATS = {"kind": "embedded", "split": "test", "limit": 12}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2IB_CACHE", str(tmp_path))
    return tmp_path / "layer-stats"


@pytest.fixture(scope="module")
def stats_samples():
    return load_dataset(STATS, progress=False)


def numpy_stats(adapter, modality, layer, samples):
    """Per-position mean and std (ddof=1, IBA's) with numpy over the same activations, the pooled values
    where a position has fewer than MIN_POSITION_COUNT observations, std floored at MIN_STD: (n, C) each."""
    rows = []
    with torch.no_grad():
        for s in samples:
            inputs = adapter.preprocess([s.image]) if modality == "image" else adapter.tokenize([s.caption])
            h = adapter.prefix(modality, inputs, layer)[0].double().numpy()
            n = h.shape[0] if modality == "image" else int(inputs.eot[0]) + 1
            rows.append(h[:n])
    length = max(len(r) for r in rows)
    every = np.concatenate(rows)
    pooled_mean, pooled_std = every.mean(0), every.std(0, ddof=1)
    mean, std = np.tile(pooled_mean, (length, 1)), np.tile(pooled_std, (length, 1))
    for t in range(length):
        at_t = np.stack([r[t] for r in rows if len(r) > t])
        if len(at_t) >= MIN_POSITION_COUNT:
            mean[t], std[t] = at_t.mean(0), at_t.std(0, ddof=1)
    return mean, np.maximum(std, MIN_STD)


def test_welford_equals_numpy_on_masked_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(7, 5, 4))
    valid = np.ones((7, 5), bool)
    valid[:3, 4] = valid[5:, 4] = False    # position 4: absent from the first batch, seen twice
    valid[5:, 3] = False
    acc = Welford()
    acc.update(torch.tensor(x[:3, :4], dtype=torch.float32), torch.tensor(valid[:3, :4]))  # shorter batch first
    acc.update(torch.tensor(x[3:], dtype=torch.float32), torch.tensor(valid[3:]))
    st = acc.result()
    x32 = x.astype(np.float32).astype(np.float64)     # the estimator sees float32 activations
    for t in range(5):
        col = x32[valid[:, t], t]
        assert st.count[t] == len(col)
        # float64 accumulation of a handful of values: agreement to ~1e-15 relative; 1e-12 is the bound
        np.testing.assert_allclose(st.mean[t].numpy(), col.mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.std()[t].numpy(), col.std(0, ddof=1), rtol=1e-12)
    pm, ps = st.pooled()
    every = x32[valid]
    np.testing.assert_allclose(pm.numpy(), every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ps.numpy(), every.std(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_layer_statistics_equal_numpy(tiny_adapter, stats_samples, modality):
    st = estimate_stats(tiny_adapter, modality, 1, stats_samples, progress=False)
    again = estimate_stats(tiny_adapter, modality, 1, stats_samples, progress=False)
    assert torch.equal(st.mean, again.mean) and torch.equal(st.m2, again.m2)     # deterministic pass
    mean, std = numpy_stats(tiny_adapter, modality, 1, stats_samples)
    got_mean, got_std = st.for_positions(mean.shape[0], "cpu")
    if modality == "text":
        assert (st.count < MIN_POSITION_COUNT).any() and (st.count >= MIN_POSITION_COUNT).any()
    # the activations differ only by batch composition (batched vs one-at-a-time prefix, float32
    # round-off ~1e-6 relative); the statistics are returned as float32
    np.testing.assert_allclose(got_mean[0].numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_std[0].numpy(), std, rtol=1e-4, atol=1e-5)


def test_iba_mode_equals_a_plain_restatement_of_ibas_bottleneck(tiny_adapter, pairs, stats_samples, cache):
    a = tiny_adapter
    px, tb = a.preprocess(pairs[0]), a.tokenize(pairs[1])
    cfg = M2IBConfig.from_kwargs(mode="iba", stats=STATS, **HP).with_model_defaults(a.default_m2ib_settings())
    seeds = [21, 22, 23]
    fast = M2IBAttributor(a, cfg).attribute(px, tb, seeds)
    est = {m: numpy_stats(a, m, 1, stats_samples) for m in ("image", "text")}
    for i, seed in enumerate(seeds):
        n_txt = int(tb.eot[i]) + 1
        estimators = {"image": tuple(torch.tensor(v, dtype=torch.float32) for v in est["image"]),
                      "text": tuple(torch.tensor(v[:n_txt], dtype=torch.float32) for v in est["text"])}
        ref = reference_pair(a.model, px[i:i + 1], tb.ids[i:i + 1], int(tb.eot[i]), cfg, seed,
                             estimators=estimators)
        # as test_m2ib's reference test: float32 forwards written differently, and statistics from batched
        # vs one-at-a-time prefixes; observed <= 2.2e-7 relative, 1e-4 is ~500x that
        torch.testing.assert_close(fast.meta["image_capacity"][i], ref["image"], rtol=1e-4,
                                   atol=1e-4 * float(ref["image"].abs().max()))
        torch.testing.assert_close(fast.meta["text_capacity"][i][:n_txt], ref["text"], rtol=1e-4,
                                   atol=1e-4 * float(ref["text"].abs().max()))
    release = M2IBAttributor(a, mode="release", **HP).attribute(px, tb, seeds)
    assert not torch.allclose(fast.meta["image_capacity"], release.meta["image_capacity"], rtol=0.05)


def test_paper_mode(tiny_adapter, pairs):
    """var = 1: every extra operation is exact (x / 1, x * 1 + 0), so 'paper' IS 'release' bit for bit;
    var = 4: IBA's bottleneck with the release's estimator (mean 0, std 2), as restated in reference.py."""
    a = tiny_adapter
    px, tb = a.preprocess(pairs[0]), a.tokenize(pairs[1])
    seeds = [5, 6, 7]
    run = lambda **kw: M2IBAttributor(a, **HP, **kw).attribute(px, tb, seeds)
    release, paper1, paper4 = run(mode="release"), run(mode="paper", var=1.0), run(mode="paper", var=4.0)
    assert torch.equal(release.image, paper1.image) and torch.equal(release.text, paper1.text)
    assert torch.equal(release.meta["image_capacity"], paper1.meta["image_capacity"])
    assert not torch.allclose(paper4.meta["image_capacity"], release.meta["image_capacity"], rtol=0.05)
    cfg = M2IBConfig.from_kwargs(mode="paper", var=4.0, **HP).with_model_defaults(a.default_m2ib_settings())
    two = (torch.tensor(0.0), torch.tensor(2.0))
    for i, seed in enumerate(seeds):
        ref = reference_pair(a.model, px[i:i + 1], tb.ids[i:i + 1], int(tb.eot[i]), cfg, seed,
                             modalities=("image",), estimators={"image": two})
        # tolerance as test_m2ib's reference test
        torch.testing.assert_close(paper4.meta["image_capacity"][i], ref["image"], rtol=1e-4,
                                   atol=1e-4 * float(ref["image"].abs().max()))


def test_statistics_cache(tiny_adapter, pairs, cache, monkeypatch):
    a = tiny_adapter
    first = explain(a, *pairs, seed=2, mode="iba", stats=STATS, **HP)
    files = sorted(p.name for p in cache.glob("*.pt"))
    assert len(files) == 2                                   # image and text, layer 1

    def no_pass(*args, **kwargs):
        raise AssertionError("the statistics were re-estimated instead of read from the cache")
    monkeypatch.setattr(stats_mod, "estimate_stats", no_pass)
    again = explain(a, *pairs, seed=2, mode="iba", stats=STATS, **HP)
    assert torch.equal(first.image, again.image) and torch.equal(first.text, again.text)
    monkeypatch.undo()
    monkeypatch.setenv("M2IB_CACHE", str(cache.parent))

    layer0 = layer_stats(a, "image", 0, STATS, progress=False)
    other_data = layer_stats(a, "image", 1, {**STATS, "limit": 6}, progress=False)
    changed = a.copy()
    with torch.no_grad():
        next(changed.model.parameters()).add_(1e-3)
    other_weights = layer_stats(changed, "image", 1, STATS, progress=False)
    assert len(list(cache.glob("*.pt"))) == 5                # three new keys, none overwritten
    assert not torch.equal(layer0.mean, other_data.mean) and not torch.equal(other_data.mean, other_weights.mean)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="iba", stats=None), "mode 'iba' needs stats"),
    (dict(mode="iba", stats="val"), "stats must be a data config mapping"),
    (dict(mode="iba", stats={"split": "val"}), "needs a data set kind"),
    (dict(mode="iba", stats={"kind": "embedded", "splt": "val"}), r"unknown key\(s\) \['splt'\]"),
    (dict(mode="iba", stats={"kind": "nope"}), "unknown data set 'nope'"),
    (dict(mode="paper", var=-1.0), "var must be > 0"),
])
def test_bad_settings_are_refused_before_any_model(kwargs, match):
    with pytest.raises(InputError, match=match):
        M2IBAttributor.check_params(kwargs)


def test_identity_records_stats_only_where_they_act():
    assert M2IBConfig.from_kwargs(mode="iba").as_flat()["stats"] == DEFAULT_STATS   # conf/method/m2ib.yaml's
    assert "stats" not in M2IBConfig.from_kwargs(mode="release", stats=STATS).as_flat()
    assert M2IBConfig.from_kwargs(mode="iba", stats=STATS).as_flat()["stats"] == STATS
