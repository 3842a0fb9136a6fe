"""Regression test on the embedded trained model: M2IB and the gradient and attention baselines
localise the caption's target clearly better than the random map on a fixed set of test pairs, and
the text-conditioned ones follow the caption.

Localisation = share of the top-k map pixels inside the true boxes, k = the boxes' area in the
preprocessed frame (the IBA bounding-box ratio, Schulz et al. 2020); pixels tied with the k-th value
join the region, so a constant map scores the box-area share. Random scores about that share too.

The embedded model and data come from m2ib.data.embedded; if the committed checkpoint is missing
this test fails with ModelUnavailableError (it is a regression test of the shipped benchmark, not
optional).
"""

import numpy as np
import pytest
import torch

from m2ib.core.attributor import get_method
from m2ib.core.geometry import boxes_to_mask


N_PAIRS = 16
#: The attention maps cost almost nothing, so they are also checked on more pairs; last-layer raw
#: attention is the weakest and noisiest baseline here (measured on this model: lead over random
#: 0.05 +- 0.05 on the first 16 test pairs, 0.14 +- 0.04 on the first 64), so it is judged on 64.
N_PAIRS_ATTENTION = 64
GRADIENT = ("m2ib", "saliency", "grad_x_input", "integrated_gradients", "gradcam")
ATTENTION = ("raw_attention", "rollout", "chefer")
#: Required lead over the random map, in absolute localisation share (a pair's share is in [0, 1];
#: random scores the box-area share, about 0.07 on this data). Measured leads when this was
#: written (first 16 / 64 test pairs): saliency 0.29, grad x input 0.21, IG 0.32, Grad-CAM 0.46,
#: rollout 0.24, Chefer 0.61, raw attention 0.14 (64 pairs).
MARGIN = {**{m: 0.15 for m in GRADIENT + ATTENTION}, "raw_attention": 0.10}
#: M2IB with no hyperparameters: the embedded model's own layers/betas (m2ib/models/embedded.py).
HPARAMS = {"integrated_gradients": {"n_steps": 16}}
#: Text-conditioned methods must move toward a distractor when the caption names it instead of the
#: target (raw attention and rollout cannot: their image map ignores the caption).
STEERED = ("m2ib", "saliency", "gradcam", "chefer")
STEER_MARGIN = 0.10


def _load(n):
    from m2ib.data.embedded import load_embedded_split
    from m2ib.models.embedded import load_embedded_adapter

    adapter = load_embedded_adapter()
    samples = load_embedded_split("test", limit=n, progress=False)
    assert len(samples) == n
    pixels = adapter.preprocess([s.image for s in samples])
    text = adapter.tokenize([s.caption for s in samples])
    H, W = adapter.image_size
    masks = []
    for s in samples:
        boxes = adapter.box_to_input_frame(s.boxes, s.image.size)
        mask = boxes_to_mask(boxes, (W, H))
        assert mask.any(), f"sample {s.id}: its boxes fall outside the model's input frame"
        masks.append(mask)
    return adapter, pixels, text, np.stack(masks)


@pytest.fixture(scope="module")
def embedded_all():
    """The first N_PAIRS_ATTENTION test pairs; the first N_PAIRS of them are the main fixed set."""
    return _load(N_PAIRS_ATTENTION)


@pytest.fixture(scope="module")
def embedded(embedded_all):
    adapter, pixels, text, masks = embedded_all
    rows = list(range(N_PAIRS))
    return adapter, pixels[:N_PAIRS], text.select(rows), masks[:N_PAIRS]


def localisation(maps: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """Per pair: share of the top-k pixels (ties with the k-th included) inside the boxes."""
    out = []
    for m, g in zip(maps.cpu().numpy(), masks):
        k = int(g.sum())
        kth = np.partition(m.ravel(), m.size - k)[m.size - k]
        region = m >= kth
        out.append((region & g).sum() / region.sum())
    return np.asarray(out)


def _options(name):
    """Image maps only; baselines also take progress=False (M2IB has no per-pair loop to report)."""
    extra = {} if name == "m2ib" else {"progress": False}
    return {"modalities": ["image"], **extra, **HPARAMS.get(name, {})}


def _scores(names, adapter, pixels, text, masks):
    seeds = list(range(len(text)))
    out = {}
    for name in names:
        method = get_method(name, adapter, **_options(name))
        out[name] = localisation(method.attribute(pixels, text, seeds).image, masks)
    return out


@pytest.fixture(scope="module")
def scores(embedded, embedded_all):
    """name -> (per-pair localisation, random's on the same pairs)."""
    small = _scores(("random",) + GRADIENT, *embedded)
    large = _scores(("random",) + ATTENTION, *embedded_all)
    out = {m: (small[m], small["random"]) for m in GRADIENT}
    out.update({m: (large[m], large["random"]) for m in ATTENTION})
    out["random"] = (small["random"], small["random"])
    return out


def test_random_scores_about_the_box_share(embedded, scores):
    """The control behaves as a control: close to the boxes' share of the frame."""
    masks = embedded[3]
    assert abs(scores["random"][0].mean() - masks.mean()) < 0.05


@pytest.mark.parametrize("name", GRADIENT + ATTENTION)
def test_beats_random_by_margin(name, scores):
    mine, rand = scores[name]
    lead = mine.mean() - rand.mean()
    assert lead >= MARGIN[name], (f"{name}: localisation {mine.mean():.3f} vs random {rand.mean():.3f} on "
                                  f"{len(mine)} pairs (lead {lead:.3f} < {MARGIN[name]})")


def _distractor(sample):
    """The first object differing from the target in colour and shape, unique in the image (so a
    caption naming it is unambiguous), or None."""
    colour, shape, _ = sample.meta["target"]
    objs = sample.meta["objects"]
    for o in objs:
        same = [p for p in objs if (p["colour"], p["shape"]) == (o["colour"], o["shape"])]
        if o["colour"] != colour and o["shape"] != shape and len(same) == 1:
            return o
    return None


@pytest.mark.parametrize("name", STEERED)
def test_caption_steers_the_map(name, embedded):
    """Same image, caption naming a distractor instead of the target: the map's share on that
    distractor's box must rise (the image alone does not say which object is meant)."""
    from m2ib.data.embedded import load_embedded_split

    adapter, pixels, text, _ = embedded
    samples = load_embedded_split("test", limit=N_PAIRS, progress=False)
    rows, captions, masks = [], [], []
    H, W = adapter.image_size
    for i, s in enumerate(samples):
        o = _distractor(s)
        if o is None:
            continue
        art = "an" if o["colour"][0] in "aeiou" else "a"
        rows.append(i)
        captions.append(f"a photo of {art} {o['colour']} {o['shape']}")
        box = adapter.box_to_input_frame(np.asarray([o["box"]], dtype=np.float32), s.image.size)
        masks.append(boxes_to_mask(box, (W, H)))
    assert len(rows) >= N_PAIRS // 2, f"only {len(rows)} of {N_PAIRS} test pairs have a distinct distractor"
    masks = np.stack(masks)
    method = get_method(name, adapter, **_options(name))
    seeds = [rows[j] for j in range(len(rows))]
    own = method.attribute(pixels[rows], text.select(rows), seeds).image
    other = method.attribute(pixels[rows], adapter.tokenize(captions), seeds).image
    gain = localisation(other, masks).mean() - localisation(own, masks).mean()
    assert gain >= STEER_MARGIN, (f"{name}: naming the distractor moved the map onto it by only {gain:.3f} "
                                  f"(over {len(rows)} pairs)")
