"""Confidence drop / increase on the tiny random model with maps whose effect is known exactly."""
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError
from m2ib.core.records import Attribution, Sample
from m2ib.pipeline.tables import aggregate
from metrics.confidence import blank_low_tokens, confidence_scores, mask_pixels


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    caps = ["a red square on the left", "a blue circle", "green triangle near a yellow star", "a small dog"]
    return [Sample(id=f"p{i}", image=Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), caption=c)
            for i, c in enumerate(caps)]


def make_attr(adapter, samples, image=None, text=None):
    batch = adapter.tokenize([s.caption for s in samples])
    return Attribution(method="hand", image=None if image is None else torch.as_tensor(image, dtype=torch.float32),
                       text=None if text is None else torch.as_tensor(text, dtype=torch.float32),
                       tokens=batch.tokens, token_mask=batch.word_mask.cpu())


def direct_similarity(adapter, pixels, text):
    with torch.no_grad():
        return (adapter.encode_image(pixels) * adapter.encode_text(text)).sum(-1).double().numpy()


def test_full_map_keeps_confidence(adapter, samples):
    rows = confidence_scores(make_attr(adapter, samples, image=np.ones((4, 32, 32))), adapter, samples)
    assert (rows.similarity == rows.masked_similarity).all()
    assert (rows["drop"] == 0).all() and (rows.increase == 0).all()
    assert list(rows.sample_id) == ["p0", "p1", "p2", "p3"]


def test_drop_equals_the_formula_on_a_hand_map(adapter, samples):
    maps = np.zeros((4, 32, 32))
    maps[:, :, :16] = 1.0                      # keep the left half only
    rows = confidence_scores(make_attr(adapter, samples, image=maps), adapter, samples, batch_size=3)
    pixels = adapter.preprocess([s.image for s in samples])
    text = adapter.tokenize([s.caption for s in samples])
    kept = pixels.clone()
    kept[..., 16:] = 0
    s, s2 = direct_similarity(adapter, pixels, text), direct_similarity(adapter, kept, text)
    np.testing.assert_allclose(rows.similarity, s, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rows.masked_similarity, s2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rows["drop"], np.maximum(0, s - s2) * 100, atol=1e-4)
    assert rows.increase.tolist() == (s2 > s).astype(int).tolist()
    summary = aggregate(rows, ["method", "modality"], ["drop", "increase"]).iloc[0]
    assert summary["drop"] == pytest.approx(np.mean(np.maximum(0, s - s2)) * 100, abs=1e-4)
    assert summary["increase"] == pytest.approx(np.mean(s2 > s))
    rel = np.where(s > 0, np.maximum(0, s - s2) / np.where(s > 0, s, 1) * 100, np.nan)
    np.testing.assert_allclose(rows.relative_drop, rel, atol=1e-3)


def test_release_compat_uses_the_first_row_only(adapter, samples):
    maps = np.zeros((4, 32, 32))
    maps[:, 0, :] = 1.0                        # first row ones, rest zeros
    attr = make_attr(adapter, samples, image=maps)
    compat = confidence_scores(attr, adapter, samples, release_compat=True)
    assert (compat["drop"] == 0).all()        # first row broadcast everywhere: image unchanged
    correct = confidence_scores(attr, adapter, samples)
    assert (correct.masked_similarity != correct.similarity).all()


def test_mask_pixels_normalises_per_sample():
    pixels = torch.ones(2, 3, 2, 2)
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = mask_pixels(pixels, maps)
    assert out[0, 0].tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert (out[1] == 1).all()                 # constant map: kept whole


def test_text_blanks_tokens_below_the_median(adapter, samples):
    text = adapter.tokenize(["a red square on the left"])   # 6 word tokens at positions 1..6
    scores = torch.zeros(text.ids.shape)
    scores[0, 1:7] = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.0, 0.7])   # median 0.45
    out = blank_low_tokens(text, scores, 0.5, adapter.blank_token_id)
    blank = adapter.blank_token_id
    changed = (out.ids != text.ids)[0].nonzero().flatten().tolist()
    assert changed == [1, 4, 5] and (out.ids[0, changed] == blank).all()
    assert out.ids[0, 0] == text.ids[0, 0] and out.ids[0, 7] == text.ids[0, 7]   # SOT / EOT untouched


def test_text_confidence_matches_direct_encoding(adapter, samples):
    text = adapter.tokenize([s.caption for s in samples])
    scores = torch.arange(text.ids.shape[1], dtype=torch.float32).repeat(4, 1) * text.word_mask.float()
    rows = confidence_scores(make_attr(adapter, samples, text=scores), adapter, samples, modality="text")
    pixels = adapter.preprocess([s.image for s in samples])
    blanked = blank_low_tokens(text, scores, 0.5, adapter.blank_token_id)
    np.testing.assert_allclose(rows.masked_similarity, direct_similarity(adapter, pixels, blanked), atol=1e-6)
    const = confidence_scores(make_attr(adapter, samples, text=text.word_mask.float()), adapter, samples,
                              modality="text")
    assert (const["drop"] == 0).all()          # constant scores blank nothing


def test_bad_input_names_the_sample(adapter, samples):
    maps = np.ones((4, 32, 32))
    attr = make_attr(adapter, samples, image=maps)
    attr.image[2, 0, 0] = float("inf")
    with pytest.raises(InputError, match="'p2'"):
        confidence_scores(attr, adapter, samples)
    with pytest.raises(InputError, match="expected the preprocessed frame"):
        confidence_scores(make_attr(adapter, samples, image=np.ones((4, 30, 32))), adapter, samples)
    other = make_attr(adapter, [Sample(id=s.id, image=s.image, caption="totally different words here")
                                for s in samples], text=np.ones((4, 77)))
    with pytest.raises(InputError, match="'p0'.*do not match"):
        confidence_scores(other, adapter, samples, modality="text")
