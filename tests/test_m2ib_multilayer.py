"""Multi-layer M2IB (CoIBA-style shared damping ratio, m2ib/method/bottleneck.py (B3)): one listed layer is
single-layer M2IB bit for bit, several layers match a plain restatement, runs repeat, bad lists are refused
in one line, and adapter.run_blocks continues a hidden state like prefix() does."""
import pytest
import torch

from m2ib.api import explain
from m2ib.core.errors import InputError
from m2ib.method import M2IBAttributor, M2IBConfig
from m2ib.models.base import ModelAdapter
from test_m2ib import assert_matches_reference
from test_models_hf import _build

HP = dict(steps=4, copies=3)


def test_one_listed_layer_is_single_layer_m2ib_bit_for_bit(tiny_adapter, pairs):
    single = explain(tiny_adapter, *pairs, seed=7, layer=1, **HP)
    listed = explain(tiny_adapter, *pairs, seed=7, layers=[1], **HP)
    for key in ("image_capacity", "text_capacity"):
        assert torch.equal(single.meta[key], listed.meta[key])
    assert torch.equal(single.image, listed.image) and torch.equal(single.text, listed.text)


@pytest.mark.parametrize("ratio", ["token_channel", "token"])
def test_several_layers_match_plain_restatement(tiny_adapter, pairs, ratio):
    a = tiny_adapter
    px, tb = a.preprocess(pairs[0]), a.tokenize(pairs[1])
    cfg = M2IBConfig.from_kwargs(layers=[0, 1], ratio=ratio, **HP).with_model_defaults(a.default_m2ib_settings())
    seeds = [21, 22, 23]
    fast = M2IBAttributor(a, cfg).attribute(px, tb, seeds)
    single = M2IBAttributor(a, layer=0, ratio=ratio, **HP).attribute(px, tb, seeds)
    # not vacuous: the second bottleneck changes the first layer's capacity through the shared alpha
    assert not torch.allclose(fast.meta["image_capacity"], single.meta["image_capacity"], rtol=1e-3)
    assert_matches_reference(a, px, tb, fast, cfg, seeds)


def test_repeatable_and_seed_matters(tiny_adapter, pairs):
    run = lambda seed: explain(tiny_adapter, *pairs, seed=seed, image_layers=[0, 1], text_layers=[0, 1], **HP)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.image, b.image) and torch.equal(a.text, b.text)
    assert not torch.equal(a.image, c.image)


@pytest.mark.parametrize("mode", ["normalized", "paper"])
def test_other_estimators_run_per_layer(tiny_adapter, pairs, mode):
    """Each layer standardises with its own estimator: var acts in both modes with several layers."""
    run = lambda var: explain(tiny_adapter, *pairs, seed=1, layers=[0, 1], mode=mode, var=var, **HP)
    one, four = run(1.0), run(4.0)
    assert torch.isfinite(one.meta["image_capacity"]).all()
    assert not torch.allclose(one.meta["image_capacity"], four.meta["image_capacity"], rtol=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_layers=[]), "image: layers must not be empty"),
    (dict(text_layers=[2, 1]), "text: layers must be strictly increasing"),
    (dict(layers=[1, 1]), "layers must be strictly increasing"),
    (dict(image_layers="1,2"), "layers must be a list"),
    (dict(image_layers=3), "layers must be a list"),
    (dict(image_layers=[0, 1.5]), "non-negative integers"),
    (dict(image_layers=[-1, 2]), "non-negative integers"),
    (dict(image_layers=[True, 2]), "non-negative integers"),
    (dict(image_layer=2, image_layers=[0, 1]), "layer 2 conflicts with layers \\[0, 1\\]"),
    (dict(text_ratio="channel"), "text: ratio must be one of"),
])
def test_bad_layer_lists_are_refused_before_any_model(kwargs, match):
    with pytest.raises(InputError, match=match) as err:
        M2IBAttributor.check_params(kwargs)
    assert "\n" not in str(err.value)


def test_out_of_range_layer_refused_at_setup(tiny_adapter, pairs):
    with pytest.raises(InputError, match="image layer 2 is out of range"):
        explain(tiny_adapter, *pairs, image_layers=[0, 2], **HP)


def test_layers_config_round_trip_and_identity():
    cfg = M2IBConfig.from_kwargs(image_layers=[0, 2], image_layer=0)
    assert cfg.image.layers == (0, 2) and cfg.image.layer == 0 and cfg.text.layers is None
    assert M2IBConfig.from_kwargs(**cfg.as_flat()) == cfg
    assert "text_layers" not in cfg.as_flat() and cfg.as_flat()["image_layers"] == (0, 2)
    # keys added for this feature appear only where set, so single-layer identities (cache keys) are unchanged
    assert not any(k.endswith(("_layers", "_ratio")) for k in M2IBConfig().as_flat())
    assert M2IBConfig.from_kwargs(ratio="token").as_flat()["text_ratio"] == "token"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tiny_hf_multi"), "m2ib-test-timm-bert-multi")


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from tiny_models import tiny_hf_clip
    return tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip_multi"))


@pytest.mark.parametrize("family", ["open_clip_vit", "open_clip_hf", "hf_clip"])
def test_run_blocks_continues_prefix(family, tiny_adapter, hf, hf_clip, pairs):
    a = {"open_clip_vit": tiny_adapter, "open_clip_hf": hf, "hf_clip": hf_clip}[family]
    inputs = {"image": a.preprocess(pairs[0]), "text": a.tokenize(pairs[1])}
    with torch.no_grad():
        for m, x in inputs.items():
            h0 = a.prefix(m, x, 0).repeat_interleave(2, dim=0)       # copies, as the bottleneck passes them
            want = a.prefix(m, x, 1).repeat_interleave(2, dim=0)
            got = a.run_blocks(m, h0, x, 0, 1)
            # float32: plain module call vs written-out blocks, ~1e-6 observed
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=f"{family} {m}")
            torch.testing.assert_close(ModelAdapter.run_blocks(a, m, h0, x, 0, 1), got, atol=2e-5, rtol=0)
            assert (got - h0).abs().max() > 1e-3      # the block did something
    with pytest.raises(InputError, match="start < stop"):
        a.run_blocks("image", h0, inputs["image"], 1, 1)
