"""The committed embedded model: its hash, its loading path, and the two quality checks of the issue.

Quality thresholds, on the whole held-out test split (500 pairs): image->caption R@1 among 20 candidates
>= 0.80 (chance 0.05; the issue's aim; the committed model measures 0.868, see
m2ib/assets/embedded/quality.json), and masking the true box lowers similarity at least 3x more than
masking a random region of the same size.
"""
import hashlib
import json

import numpy as np
import pytest
import torch

from m2ib.data import embedded
from m2ib.models import embedded as model_assets
from m2ib.data.embedded_quality import masking_effect, retrieval_at_1
from m2ib.core.errors import ModelUnavailableError

N_TEST = 500


@pytest.fixture(scope="module")
def adapter():
    return model_assets.load_embedded_adapter()


@pytest.fixture(scope="module")
def test_pairs():
    return embedded.load_embedded_split("test", limit=N_TEST, progress=False)


def test_checkpoint_hash_size_and_provenance():
    digest = hashlib.sha256(model_assets.CHECKPOINT.read_bytes()).hexdigest()
    assert model_assets.CHECKPOINT_SHA256.read_text().split()[0] == digest == model_assets.verify_checkpoint()
    assert model_assets.CHECKPOINT.stat().st_size <= 20e6
    log = json.loads((model_assets.ASSET_DIR / "training_log.json").read_text())
    assert log["checkpoint_sha256"] == digest and log["data_seed"] == embedded.DATA_SEED
    state = torch.load(model_assets.CHECKPOINT, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    data = bytearray(model_assets.CHECKPOINT.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailableError, match="bad.pt has sha256"):
        model_assets.verify_checkpoint(bad)
    with pytest.raises(ModelUnavailableError, match="missing"):
        model_assets.verify_checkpoint(tmp_path / "absent.pt")


def test_loads_through_the_open_clip_checkpoint_path(adapter):
    assert adapter.name == model_assets.EMBEDDED_MODEL_NAME
    assert adapter.image_size == (64, 64) and adapter.num_layers["image"] >= 3
    state = torch.load(model_assets.CHECKPOINT, weights_only=True)["state_dict"]
    w = adapter.model.state_dict()["visual.conv1.weight"]
    assert torch.equal(w, state["visual.conv1.weight"].float())


def test_split_samples_carry_both_ground_truths(test_pairs):
    assert len(test_pairs) == N_TEST
    for s in test_pairs[:50]:
        assert s.target_words and all(w in s.caption.split() for w in s.target_words)
        assert s.boxes.shape[1] == 4 and len(s.boxes) >= 1 and s.image.size == embedded.IMAGE_SIZE
    again = embedded.load_embedded_split("test", limit=3, progress=False)
    assert [a.id for a in again] == [s.id for s in test_pairs[:3]]
    assert np.array_equal(np.asarray(again[0].image), np.asarray(test_pairs[0].image))


def test_held_out_zero_shot_retrieval(adapter, test_pairs):
    r = retrieval_at_1(adapter, test_pairs, n_candidates=20, seed=0)
    assert r["r_at_1"] >= 0.80, r


def test_model_uses_the_target(adapter, test_pairs):
    m = masking_effect(adapter, test_pairs, seed=0)
    assert m["drop_target"] > 0 and m["drop_target"] >= 3 * max(m["drop_random"], 1e-6), m
    assert m["frac_target_drop_larger"] >= 0.8, m


def test_caption_steers_the_similarity(adapter, test_pairs):
    """Same image, a caption naming an absent object scores lower than the true caption (not text-blind)."""
    from m2ib.data.embedded_quality import _present, embed
    wins = []
    for i, s in enumerate(test_pairs[:60]):
        j = next(j for j in range(i + 1, i + N_TEST) if not _present(test_pairs[j % N_TEST], s))
        img, txt = embed(adapter, [s.image], [s.caption, test_pairs[j % N_TEST].caption])
        wins.append(bool((txt[0] @ img[0]) > (txt[1] @ img[0])))
    assert np.mean(wins) >= 0.85
