"""M2IB: the fast path reproduces the release algorithm, batching changes nothing, bad input is named."""
import numpy as np
import pytest
import torch

from m2ib.api import explain
from m2ib.method.bottleneck import M2IBConfig, capacity
from m2ib.core.errors import DataUnavailableError, InputError
from m2ib.method import M2IBAttributor
from m2ib.method.reference import reference_pair

HP = dict(layer=1, steps=4, copies=3)


def test_capacity_formula():
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 (s^2 + mu^2 - 1 - log s^2), with mu = lam r, s = 1 - lam.
    lam, r = torch.tensor([0.3]), torch.tensor([2.0])
    s2 = 0.7 ** 2
    expected = 0.5 * (s2 + 0.36 - 1 - np.log(s2))
    assert capacity(lam, r).item() == pytest.approx(expected, rel=1e-6)
    assert capacity(torch.tensor([1e-6]), torch.tensor([5.0])).item() == pytest.approx(0, abs=1e-5)


def test_fast_path_reproduces_reference_with_same_noise(tiny_adapter, pairs):
    a = tiny_adapter
    px, tb = a.preprocess(pairs[0]), a.tokenize(pairs[1])
    cfg = M2IBConfig.from_kwargs(**HP).with_model_defaults(a.default_m2ib_settings())
    seeds = [11, 12, 13]
    fast = M2IBAttributor(a, cfg).attribute(px, tb, seeds)
    assert_matches_reference(a, px, tb, fast, cfg, seeds)


def assert_matches_reference(adapter, px, tb, fast, cfg, seeds):
    """Each pair's capacities of `fast` equal the plain reference (m2ib.method.reference) on the same noise.
    float32 rounding differs between the two forwards (fused vs written-out attention, cut text); relative
    1e-4 of the largest capacity is ~100x the observed difference."""
    for i, seed in enumerate(seeds):
        ref = reference_pair(adapter.model, px[i:i + 1], tb.ids[i:i + 1], int(tb.eot[i]), cfg, seed)
        n_txt = int(tb.eot[i]) + 1
        torch.testing.assert_close(fast.meta["image_capacity"][i], ref["image"], rtol=1e-4,
                                   atol=1e-4 * float(ref["image"].abs().max()))
        torch.testing.assert_close(fast.meta["text_capacity"][i][:n_txt], ref["text"], rtol=1e-4,
                                   atol=1e-4 * float(ref["text"].abs().max()))


def test_batch_equals_one_pair_at_a_time(tiny_adapter, pairs):
    images, captions = pairs
    batched = explain(tiny_adapter, images, captions, batch_size=3, seed=5, **HP)
    for i in range(3):
        single = explain(tiny_adapter, images[i:i + 1], captions[i:i + 1], ids=[str(i)], seed=5, **HP)
        torch.testing.assert_close(batched.meta["image_capacity"][i], single.meta["image_capacity"][0],
                                   rtol=1e-4, atol=1e-4)
        width = single.text.shape[1]
        torch.testing.assert_close(batched.text[i, :width], single.text[0], rtol=1e-4, atol=1e-4)


def test_repeatable_bit_for_bit_and_seed_matters(tiny_adapter, pairs):
    a = explain(tiny_adapter, *pairs, seed=3, **HP)
    b = explain(tiny_adapter, *pairs, seed=3, **HP)
    c = explain(tiny_adapter, *pairs, seed=4, **HP)
    assert torch.equal(a.image, b.image) and torch.equal(a.text, b.text)
    assert not torch.equal(a.image, c.image)


def test_output_contract(tiny_adapter, pairs):
    att = explain(tiny_adapter, *pairs, **HP)
    assert att.image.shape == (3, *tiny_adapter.image_size)
    assert float(att.image.min()) == 0.0 and float(att.image.max()) == 1.0
    assert att.text.shape == att.token_mask.shape
    assert torch.all(att.text[~att.token_mask] == 0) and torch.all(att.text[att.token_mask] > 0)
    assert [t for t, _ in att.word_scores(0)] == ["a", "red", "circle"]
    assert all(p.grad is None for p in tiny_adapter.model.parameters())


def test_single_modality(tiny_adapter, pairs):
    att = explain(tiny_adapter, *pairs, modalities=("text",), **HP)
    assert att.image is None and att.text is not None


def test_var_is_inert_in_release_mode_and_acts_in_normalized_mode(tiny_adapter, pairs):
    run = lambda **kw: explain(tiny_adapter, *pairs, seed=1, **HP, **kw)
    assert torch.equal(run(mode="release", var=1.0).image, run(mode="release", var=4.0).image)
    n1, n4 = run(mode="normalized", var=1.0), run(mode="normalized", var=4.0)
    assert not torch.allclose(n1.meta["image_capacity"], n4.meta["image_capacity"])
    assert torch.isfinite(n4.image).all()


def test_beta_shrinks_capacity(tiny_adapter, pairs):
    low = explain(tiny_adapter, *pairs, seed=1, beta=0.01, **HP).meta["image_capacity"].sum()
    high = explain(tiny_adapter, *pairs, seed=1, beta=10.0, **HP).meta["image_capacity"].sum()
    assert high < low


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=2), "valid bottleneck layers are 0..1"),
    (dict(beta=-1), "beta"),
    (dict(var=0), "var"),
    (dict(mode="fast"), "mode"),
    (dict(lyer=1), "unknown M2IB hyperparameter 'lyer'"),
    (dict(beta=float("nan")), "beta must be finite"),
    (dict(init_alpha=float("inf")), "init_alpha must be finite"),
    (dict(steps="10"), "steps must be an integer"),
])
def test_bad_hyperparameters(tiny_adapter, pairs, kwargs, match):
    with pytest.raises(InputError, match=match):
        explain(tiny_adapter, *pairs, **{**HP, **kwargs})


def test_bad_inputs_are_named(tiny_adapter, pairs, tmp_path):
    images, _ = pairs
    with pytest.raises(InputError, match="caption 1"):
        explain(tiny_adapter, images[:2], ["fine", ""], **HP)
    with pytest.raises(DataUnavailableError, match="missing.png"):
        explain(tiny_adapter, [tmp_path / "missing.png"], ["x"], **HP)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png"):
        explain(tiny_adapter, [bad], ["x"], **HP)
    with pytest.raises(InputError, match="2 images but 1 captions"):
        explain(tiny_adapter, images[:2], ["x"], **HP)


def test_non_finite_activations_are_an_error(tiny_adapter, pairs):
    a = tiny_adapter
    px, tb = a.preprocess(pairs[0]), a.tokenize(pairs[1])
    px[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"non-finite image activations .* rows \[1\]"):
        M2IBAttributor(a, **HP).attribute(px, tb, [0, 1, 2])


def test_truncated_caption_is_recorded(tiny_adapter, pairs):
    with pytest.warns(UserWarning, match="truncated"):
        att = explain(tiny_adapter, pairs[0][:1], ["word " * 90], **HP)
    assert att.meta["truncated"] == [True]


def test_meta_is_per_pair_across_batches(tiny_adapter, pairs):
    att = explain(tiny_adapter, *pairs, batch_size=2, **HP)
    assert att.meta["truncated"] == [False, False, False]
    assert att.meta["image_capacity"].shape[0] == 3 and att.meta["text_capacity"].shape[0] == 3
    assert att.meta["similarity"].shape == (3,)


def test_layers_and_betas_default_to_the_model_description(tiny_adapter):
    # m2ib-tiny-vit has 3 blocks per tower and no published settings: the rule gives layer 1, beta 0.1
    assert tiny_adapter.default_m2ib_settings() == {"image_layer": 1, "text_layer": 1, "image_beta": 0.1,
                                                    "text_beta": 0.1}
    m = M2IBAttributor(tiny_adapter, text_beta=2.0)
    assert (m.config.image.layer, m.config.text.layer, m.config.image.beta, m.config.text.beta) == (1, 1, 0.1, 2.0)


def test_config_and_keywords_together_are_refused(tiny_adapter):
    with pytest.raises(InputError, match="either config= or keyword"):
        M2IBAttributor(tiny_adapter, config=M2IBConfig.from_kwargs(**HP), beta=1.0)


def test_amp_runs_the_steps_in_bf16_on_the_cpu_too(tiny_adapter, pairs):
    """amp=True: bf16 autocast of the steps on the pair's device; other numbers than fp32, the same map
    up to bf16 rounding (tiny random model: Pearson r of the capacities; 0.9999 measured on ViT-B/32)."""
    from m2ib.api import explain
    images, captions = pairs
    hp = dict(layer=1, steps=3, copies=4)
    fp32 = explain(tiny_adapter, images, captions, **hp)
    bf16 = explain(tiny_adapter, images, captions, amp=True, **hp)
    for m in ("image", "text"):
        a, b = fp32.meta[f"{m}_capacity"], bf16.meta[f"{m}_capacity"]
        assert not torch.equal(a, b)                                   # bf16 really ran
        for x, y in zip(a, b):
            assert torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] > 0.99, m
