"""ROAR+ on the tiny random model: exact degradations, the no-training identity, equal treatment of a
method and the random reference, bit-for-bit repeatability and exact checkpoint resumption."""
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib.core.errors import InputError
from m2ib.core.records import Attribution, Sample
from m2ib.core.attributor import attribute_with
from m2ib.pipeline.tables import aggregate
from metrics.roar import RoarConfig, degrade_images, degrade_text, roar_plus, split_indices


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(2)
    colours, shapes = ["red", "blue", "green", "yellow", "purple"], ["square", "circle", "star", "triangle"]
    return [Sample(id=f"r{i:02d}", image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                   caption=f"a {colours[i % 5]} {shapes[i // 5]} on a plain background") for i in range(20)]


CFG = RoarConfig(epochs=2, lr=1e-3, batch_size=8, seed=0)


def brightness(adapter, samples):
    pixels = adapter.preprocess([s.image for s in samples])
    text = adapter.tokenize([s.caption for s in samples])
    pos = torch.arange(text.ids.shape[1], dtype=torch.float32)[None] * text.word_mask.float()
    return Attribution("brightness", pixels.mean(1).cpu(), pos.cpu(), text.tokens, text.word_mask.cpu())


def test_degrade_images_replaces_exactly_the_top_quarter():
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    maps = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4).repeat(2, 1, 1)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = degrade_images(pixels, maps, 75.0, fill)
    top = maps[0] > 11.25                       # 75th percentile of 0..15 (linear): 4 pixels above
    assert int(top.sum()) == 4
    for c in range(3):
        assert (out[:, c][:, top] == fill[c]).all()
        assert torch.equal(out[:, c][:, ~top], pixels[:, c][:, ~top])


def test_degrade_text_blanks_the_top_tokens(adapter):
    text = adapter.tokenize(["a red square on the left"])        # word tokens at 1..6
    scores = torch.zeros(text.ids.shape)
    scores[0, 1:7] = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.0, 0.7])  # 75th percentile 0.775
    out = degrade_text(text, scores, 75.0, adapter.blank_token_id)
    changed = (out.ids != text.ids)[0].nonzero().flatten().tolist()
    assert changed == [2, 3] and (out.ids[0, changed] == adapter.blank_token_id).all()


def test_split_is_seeded_and_disjoint():
    a, b = split_indices(20, 0.8, 0)
    assert len(a) == 16 and len(b) == 4 and not set(a) & set(b)
    assert [x.tolist() for x in split_indices(20, 0.8, 0)] == [a.tolist(), b.tolist()]
    with pytest.raises(InputError, match="at least 2"):
        split_indices(3, 0.8, 0)


def test_no_training_gives_the_degraded_similarity(adapter, samples):
    cfg = RoarConfig(epochs=0, batch_size=8)
    rows = roar_plus(adapter, samples, brightness, modalities=("image",), config=cfg, random_baseline=False,
                     progress=False)
    assert rows.method.unique().tolist() == ["brightness"] and len(rows) == 4
    _, ev = split_indices(20, 0.8, 0)
    pixels = adapter.preprocess([s.image for s in samples])
    fill = pixels.double().mean(dim=(0, 2, 3))
    deg = degrade_images(pixels, brightness(adapter, samples).image, 75.0, fill)[ev.tolist()]
    text = adapter.tokenize([samples[i].caption for i in ev])
    with torch.no_grad():
        sims = adapter.encode_image(deg).double() @ adapter.encode_text(text).double().T
    np.testing.assert_allclose(rows.similarity, sims.diagonal().numpy(), atol=1e-6)
    assert (rows.similarity == rows.similarity_before).all()
    hits = [int(sims[i, i] > max(sims[i, j] for j in range(4) if j != i)) for i in range(4)]
    assert rows.r1_image_to_text.tolist() == hits


def test_method_with_random_maps_equals_the_reference_and_repeats(adapter, samples):
    same = attribute_with("random", seed=CFG.seed)             # the reference is the registered random method
    before = [p.detach().clone() for p in adapter.parameters()]
    rows = roar_plus(adapter, samples, {"copy": same}, modalities=("image",), config=CFG, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(before, adapter.parameters()))      # original untouched
    a = rows[rows.method == "copy"].drop(columns="method").reset_index(drop=True)
    b = rows[rows.method == "random"].drop(columns="method").reset_index(drop=True)
    assert a.equals(b)                                                                # same pipeline
    assert (rows.similarity != rows.similarity_before).all()                          # fine-tuning acted
    again = roar_plus(adapter, samples, {"copy": same}, modalities=("image",), config=CFG, random_baseline=False,
                      progress=False)
    first = rows[rows.method == "copy"].reset_index(drop=True)
    assert first.equals(again)                                                        # bit-for-bit
    summary = aggregate(rows, ["method", "modality"], ["similarity"])
    assert summary.method.tolist() == ["copy", "random"] and (summary.n == 4).all()
    assert summary.similarity.iloc[0] == pytest.approx(rows[rows.method == "copy"].similarity.mean())


def test_checkpoint_resume_is_exact(adapter, samples, tmp_path):
    full = roar_plus(adapter, samples, brightness, modalities=("text",), config=CFG, random_baseline=False,
                     progress=False)
    one = RoarConfig(**{**CFG.__dict__, "epochs": 1})
    roar_plus(adapter, samples, brightness, modalities=("text",), config=one, random_baseline=False,
              checkpoint_dir=tmp_path, progress=False)
    resumed = roar_plus(adapter, samples, brightness, modalities=("text",), config=CFG, random_baseline=False,
                        checkpoint_dir=tmp_path, progress=False)
    assert resumed.equals(full)
    with pytest.raises(InputError, match="holds 2 epochs"):
        roar_plus(adapter, samples, brightness, modalities=("text",), config=one, random_baseline=False,
                  checkpoint_dir=tmp_path, progress=False)


def test_bad_maps_name_the_sample(adapter, samples):
    def broken(adapter, samples):
        a = brightness(adapter, samples)
        a.image = a.image[:, :16]
        return a
    with pytest.raises(InputError, match="r00"):
        roar_plus(adapter, samples, broken, modalities=("image",), config=CFG, progress=False)
    with pytest.raises(InputError, match="percentile"):
        roar_plus(adapter, samples, brightness, config=RoarConfig(percentile=100), progress=False)
