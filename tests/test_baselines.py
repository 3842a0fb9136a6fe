"""Every baseline through the shared Attributor API on the tiny random model: shapes, finiteness,
word-token-only text scores, seeded repeatability, batch independence, method-specific identities
(IG and KernelSHAP completeness, occlusion = leave-one-out, rollout vs raw attention, saliency =
autograd gradient), and clear errors for bad input or an unsupported model family."""
import contextlib

import pytest
import torch

from m2ib.core.attributor import available_methods, get_method
from m2ib.core.errors import InputError, UnsupportedError


SEEDS = [11, 22, 33]
#: The M2IB family (m2ib, m2ib_readout: tests/test_m2ib.py, tests/test_readout.py) is not a baseline.
BASELINES = [name for name in available_methods() if name not in ("m2ib", "m2ib_readout")]
# Small settings so each call takes well under a second on the tiny model.
FAST = {"rise": {"n_masks": 64, "batch_size": 32}, "kernel_shap": {"n_samples": 40, "n_segments": 12},
        "integrated_gradients": {"n_steps": 8}}
SEEDED = ("rise", "kernel_shap", "random")
#: Batch-independence tolerance of the unseeded methods. NIB's patch values on this random model are
#: ~1e-5, sums over channels of terms ~1e-3 that cancel, so the ~1e-7 float32 noise of a batch's other
#: summation order reaches ~1e-3 of its min-max normalised map (measured 2.6e-4).
BATCH_TOLERANCE = {"nib": {"rtol": 0.0, "atol": 1e-3}}


@pytest.fixture(scope="module")
def batch(tiny_adapter, pairs):
    images, captions = pairs
    return tiny_adapter.preprocess(images), tiny_adapter.tokenize(captions)


def make(name, adapter, **kw):
    return get_method(name, adapter, progress=False, **{**FAST.get(name, {}), **kw})


@pytest.fixture(scope="module")
def results(tiny_adapter, batch):
    pixels, text = batch
    return {name: make(name, tiny_adapter).attribute(pixels, text, SEEDS) for name in BASELINES}


def test_all_registered():
    assert set(BASELINES) == {"saliency", "grad_x_input", "integrated_gradients", "gradcam", "rise", "occlusion",
                              "kernel_shap", "raw_attention", "rollout", "chefer", "random", "grad_eclip", "legrad",
                              "nib", "mfaba", "fastig"}


@pytest.mark.parametrize("name", BASELINES)
def test_contract(name, results, tiny_adapter, batch):
    pixels, text = batch
    a = results[name]
    assert a.method == name
    assert a.image.shape == (3, *tiny_adapter.image_size) and a.image.dtype == torch.float32
    assert a.text.shape == text.ids.shape and a.text.dtype == torch.float32
    assert torch.isfinite(a.image).all() and torch.isfinite(a.text).all()
    assert a.tokens == text.tokens and torch.equal(a.token_mask, text.word_mask)
    assert (a.text[~text.word_mask] == 0).all(), "scores outside real word tokens"
    # Not degenerate: each image map varies, and the words of the long caption are not all equal.
    assert (a.image.flatten(1).std(1) > 0).all()
    words = a.text[1][text.word_mask[1]]
    assert words.numel() == 10 and words.std() > 0
    assert a.seconds > 0


@pytest.fixture(scope="module")
def alone(tiny_adapter, batch):
    """Each method on pair 0 alone, with pair 0's seed: its caption is shorter than the batch's
    longest, so the text runs on fewer positions than inside the batch."""
    pixels, text = batch
    return {name: make(name, tiny_adapter).attribute(pixels[:1], text.select([0]), SEEDS[:1])
            for name in BASELINES}


@pytest.mark.parametrize("name", BASELINES)
def test_repeatable(name, alone, tiny_adapter, batch):
    """A fresh instance on the same pair and seed gives bit-identical maps (CPU)."""
    pixels, text = batch
    again = make(name, tiny_adapter).attribute(pixels[:1], text.select([0]), SEEDS[:1])
    assert torch.equal(again.image, alone[name].image)
    assert torch.equal(again.text, alone[name].text)


@pytest.mark.parametrize("name", BASELINES)
def test_pair_does_not_depend_on_its_batch(name, results, alone):
    """A pair alone (same seed) gets the map it got inside the batch; bit-exact for seeded methods."""
    ref, one = results[name], alone[name]
    if name in SEEDED:
        assert torch.equal(one.image[0], ref.image[0])
        assert torch.equal(one.text[0], ref.text[0])
    else:
        tol = BATCH_TOLERANCE.get(name, {"rtol": 1e-4, "atol": 1e-6})
        torch.testing.assert_close(one.image[0], ref.image[0], **tol)
        torch.testing.assert_close(one.text[0], ref.text[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SEEDED)
def test_seed_changes_seeded_maps(name, results, tiny_adapter, batch):
    pixels, text = batch
    other = make(name, tiny_adapter).attribute(pixels, text, [s + 1 for s in SEEDS])
    assert not torch.equal(other.image, results[name].image)
    assert not torch.equal(other.text[1], results[name].text[1])


def _sim_image(adapter, pixels, text):
    with torch.no_grad():
        return (adapter.encode_image(pixels) * adapter.encode_text(text)).sum(-1)


def test_saliency_is_the_input_gradient(results, tiny_adapter, batch):
    pixels, text = batch
    x = pixels.clone().requires_grad_(True)
    t = tiny_adapter.encode_text(text).detach()
    (grad,) = torch.autograd.grad((tiny_adapter.encode_image(x) * t).sum(), x)
    torch.testing.assert_close(results["saliency"].image, grad.abs().amax(1))


def test_integrated_gradients_completeness(tiny_adapter, batch):
    """IG sums to s(input) - s(baseline) (Sundararajan et al. 2017, Prop. 1), up to quadrature error."""
    pixels, text = batch
    a = make("integrated_gradients", tiny_adapter, n_steps=32).attribute(pixels, text, SEEDS)
    gap_img = _sim_image(tiny_adapter, pixels, text) - _sim_image(tiny_adapter, torch.zeros_like(pixels), text)
    torch.testing.assert_close(a.image.sum((1, 2)), gap_img, rtol=0.03, atol=2e-4)
    blank = text.with_blanks(torch.ones_like(text.word_mask), tiny_adapter.blank_token_id)
    gap_txt = _sim_image(tiny_adapter, pixels, text) - _sim_image(tiny_adapter, pixels, blank)
    torch.testing.assert_close(a.text.sum(1), gap_txt, rtol=0.03, atol=2e-4)


def test_kernel_shap_text_efficiency(results, tiny_adapter, batch):
    """SHAP values add up to s(all words) - s(no words); captum pins both ends with large weights."""
    pixels, text = batch
    blank = text.with_blanks(torch.ones_like(text.word_mask), tiny_adapter.blank_token_id)
    gap = _sim_image(tiny_adapter, pixels, text) - _sim_image(tiny_adapter, pixels, blank)
    torch.testing.assert_close(results["kernel_shap"].text.sum(1), gap, rtol=0.02, atol=1e-4)
    # One-word caption ('green'): exact Shapley value.
    assert results["kernel_shap"].text[2].sum() == pytest.approx(float(gap[2]), abs=1e-6)


def test_text_occlusion_is_leave_one_word_out(results, tiny_adapter, batch):
    pixels, text = batch
    full = _sim_image(tiny_adapter, pixels[1:2], text.select([1]))
    for j in text.word_mask[1].nonzero().flatten().tolist()[:4]:
        keep = torch.ones_like(text.ids[1:2], dtype=torch.bool)
        keep[0, j] = False
        dropped = _sim_image(tiny_adapter, pixels[1:2], text.select([1]).with_blanks(~keep, tiny_adapter.blank_token_id))
        assert float(results["occlusion"].text[1, j]) == pytest.approx(float(full - dropped), abs=1e-5)


def test_blanking_keeps_start_and_end_tokens(tiny_adapter, batch):
    _, text = batch
    blank = text.with_blanks(torch.ones_like(text.word_mask), tiny_adapter.blank_token_id)
    assert torch.equal(blank.ids[~text.word_mask], text.ids[~text.word_mask])
    assert (blank.ids[text.word_mask] == tiny_adapter.blank_token_id).all()


def test_rollout_of_last_block_is_half_raw_attention(results, tiny_adapter, batch):
    """One block of rollout is 0.5 A + 0.5 I: off the diagonal exactly half the raw attention."""
    pixels, text = batch
    last = min(tiny_adapter.num_layers.values()) - 1
    one = make("rollout", tiny_adapter, start_layer=last).attribute(pixels, text, SEEDS)
    torch.testing.assert_close(one.text, 0.5 * results["raw_attention"].text)
    torch.testing.assert_close(one.image, 0.5 * results["raw_attention"].image)


def test_attention_maps_are_probabilities_and_chefer_nonnegative(results):
    for name in ("raw_attention", "rollout"):
        assert (results[name].image >= 0).all() and (results[name].text >= 0).all()
        assert (results[name].text.sum(1) <= 1 + 1e-5).all()
    assert (results["chefer"].text >= 0).all() and (results["chefer"].image >= -1e-7).all()
    g = results["gradcam"].image
    assert g.min() >= 0 and g.max() <= 1 + 1e-5


def test_only_one_modality(tiny_adapter, batch):
    pixels, text = batch
    a = make("saliency", tiny_adapter, modalities=["text"]).attribute(pixels, text, SEEDS)
    assert a.image is None and a.text.shape == text.ids.shape


def test_bad_inputs_name_the_problem(tiny_adapter, batch):
    pixels, text = batch
    m = make("random", tiny_adapter)
    with pytest.raises(InputError, match="3 seeds"):
        m.attribute(pixels, text, [1, 2])
    with pytest.raises(InputError, match="expects preprocessed images"):
        m.attribute(pixels[:, :, :16, :16], text, SEEDS)
    with pytest.raises(InputError, match="2 captions"):
        m.attribute(pixels, text.select([0, 1]), SEEDS)
    with pytest.raises(InputError, match="seed of pair 1"):
        m.attribute(pixels, text, [1, 2.5, 3])
    with pytest.raises(InputError, match="n_mask"):
        get_method("rise", tiny_adapter, n_mask=10)
    with pytest.raises(InputError, match="n_masks"):
        get_method("rise", tiny_adapter, n_masks=0)
    with pytest.raises(InputError, match="start_layer"):
        get_method("chefer", tiny_adapter, start_layer=99)
    with pytest.raises(InputError, match="modalities"):
        get_method("random", tiny_adapter, modalities=["audio"])


class _NoAttentionNoCam:
    """Wraps an adapter like a family with no attention weights and no Grad-CAM layer (e.g. a
    ResNet tower whose adapter does not record anything)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def record_attention(self, modality):
        yield []

    def gradcam_target(self, modality):
        raise UnsupportedError(f"no Grad-CAM layer for {modality}")


@pytest.mark.parametrize("name", ["raw_attention", "rollout", "chefer", "gradcam"])
def test_unsupported_family_says_so(name, tiny_adapter, batch):
    pixels, text = batch
    with pytest.raises(UnsupportedError):
        make(name, _NoAttentionNoCam(tiny_adapter)).attribute(pixels, text, SEEDS)


def test_superpixels_follow_colour_edges():
    """KernelSHAP's image features: SLIC regions do not straddle a sharp colour edge; a flat image
    falls back to a regular grid."""
    from baselines.perturbation import superpixels

    img = torch.zeros(3, 32, 32)
    img[0, :, :13] = 2.0     # red-ish left part, edge at column 13 (not a grid line)
    img[2, :, 13:] = 2.0
    seg = superpixels(img, 16, 10.0)
    assert seg.max() >= 3
    left, right = set(seg[:, :13].ravel().tolist()), set(seg[:, 13:].ravel().tolist())
    assert not left & right
    flat = superpixels(torch.zeros(3, 32, 32), 16, 10.0)
    assert flat.max() + 1 == 16 and (flat[:8, :8] == flat[0, 0]).all()
