"""The readout bottleneck (m2ib_readout): its objective IS per-sample M2IB's, its map is the capacity of
its own alpha, training and maps repeat bit for bit, the cache is keyed by every setting and never
retrains on a hit, and bad settings or a missing readout are refused in one line."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from m2ib.core.attributor import get_method
from m2ib.core.errors import InputError
from m2ib.core.maps import normalise_minmax
from m2ib.data.embedded import load_embedded_split
from m2ib.method.bottleneck import ModalityConfig, capacity, draw_noise, fit_bottleneck, pair_generators
from m2ib.method.readout import (ReadoutAttributor, build_net, features, hidden_states, lambdas, objective, readout_specs,
                                 train_and_cache, train_readout)
from m2ib.pipeline.readout import ensure_readouts

#: Small training so each test takes a second or two on the tiny model; layer 0 so two layers are read.
HP = dict(image_layer=0, text_layer=0, train_split="test", train_pairs=6, epochs=2, batch_size=3, lr=0.01)
SEEDS = [11, 12, 13]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2IB_READOUT_CACHE", str(tmp_path / "readout"))
    return tmp_path / "readout"


@pytest.fixture(scope="module")
def train_samples():
    return load_embedded_split("test", limit=HP["train_pairs"], progress=False)


@pytest.fixture
def trained(tiny_adapter, cache):
    """The m2ib_readout Attributor, both readouts trained into the temporary cache."""
    ensure_readouts(tiny_adapter, HP, progress=False)
    return get_method("m2ib_readout", tiny_adapter, progress=False, **HP)


@pytest.fixture(scope="module")
def batch(tiny_adapter, pairs):
    return tiny_adapter.preprocess(pairs[0]), tiny_adapter.tokenize(pairs[1])


def test_objective_is_fit_bottlenecks_first_step(tiny_adapter, batch):
    """A readout predicting the constant init_alpha (last layer's weights zero) gives, with the same noise,
    exactly the capacity, fitting and compression of per-sample M2IB's first step (fit_bottleneck returns
    its last forward, i.e. the one before the single Adam step)."""
    pixels, text = batch
    with torch.no_grad():
        embeddings = {"image": tiny_adapter.encode_image(pixels), "text": tiny_adapter.encode_text(text)}
    for modality, inputs, other in (("image", pixels, "text"), ("text", text, "image")):
        spec = readout_specs(tiny_adapter, {**HP, f"{modality}_alpha": "token"}, (modality,))[modality]
        net = build_net(tiny_adapter, spec)
        with torch.no_grad():
            net.layers[-1].weight.zero_()
        feats = features(tiny_adapter, spec, inputs, embeddings[other])
        lam = lambdas(net, feats)
        hp = ModalityConfig(layer=spec.layer, beta=spec.beta, steps=1, copies=2, init_alpha=spec.init_alpha)
        noise = draw_noise(pair_generators(SEEDS, modality, tiny_adapter.device), hp.copies,
                           feats.valid.sum(1).tolist(), feats.hidden.shape[1:], tiny_adapter.device)
        # with autograd on, as in fit_bottleneck (nn.MultiheadAttention's no-grad fast path rounds differently)
        compression, fitting = objective(tiny_adapter, spec, inputs, feats, lam, noise)
        ref = fit_bottleneck(tiny_adapter, modality, inputs, embeddings[other], hp, "release", SEEDS)
        assert torch.equal(lam, torch.sigmoid(torch.full_like(lam, spec.init_alpha)))
        # R comes from the readout's one recorded pass (written-out attention) and fit_bottleneck's from
        # prefix() (fused attention): equal to float32 rounding, ~1e-6 relative; 1e-4 leaves a wide margin.
        close = dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((capacity(lam, feats.hidden) * feats.valid[..., None]).sum(-1), ref.capacity, **close)
        torch.testing.assert_close(fitting.detach(), ref.fitting, **close)
        torch.testing.assert_close(compression.detach(), ref.compression, **close)


def test_one_pass_hidden_states_equal_prefix(tiny_adapter, batch):
    for modality, inputs in zip(("image", "text"), batch):
        states = hidden_states(tiny_adapter, modality, inputs, [1, 0])
        for layer, state in states.items():
            # float32 rounding of written-out vs fused attention (~1e-7 relative); 1e-5 is a wide margin
            torch.testing.assert_close(state, tiny_adapter.prefix(modality, inputs, layer), rtol=1e-5, atol=1e-5)


def test_map_is_the_capacity_of_its_own_alpha(trained, tiny_adapter, batch):
    """The readout's alpha, fed to the per-sample capacity (bottleneck.capacity) and rendering, gives its
    map exactly; a plain restatement of the KL (torch.distributions) agrees to float32 rounding."""
    pixels, text = batch
    att = trained.attribute(pixels, text, SEEDS)
    all_feats, _ = trained.pair_features(pixels, text)
    for modality, feats in all_feats.items():
        with torch.no_grad():
            lam = lambdas(trained.nets[modality], feats)
        assert lam.min() < lam.max()                        # a trained, pair-dependent alpha, not a constant
        per_sample = (capacity(lam, feats.hidden) * feats.valid[..., None]).sum(-1)
        torch.testing.assert_close(att.meta[f"{modality}_capacity"], per_sample, rtol=0, atol=0)
        plain = kl_divergence(Normal(lam * feats.hidden, 1 - lam), Normal(0.0, 1.0))
        plain = torch.where(feats.valid[..., None], plain, 0.0).sum(-1)
        # float32: the two KL formulas round differently, ~1e-7 relative of each element's terms
        torch.testing.assert_close(per_sample, plain, rtol=1e-4, atol=1e-5)
        if modality == "image":
            assert torch.equal(att.image, normalise_minmax(tiny_adapter.hidden_to_image_map(per_sample)))
        else:
            assert torch.equal(att.text, tiny_adapter.hidden_to_text_scores(per_sample, text) * att.token_mask)


def test_training_repeats_bit_for_bit_and_lowers_the_loss(tiny_adapter, train_samples):
    spec = readout_specs(tiny_adapter, HP, ("image",))["image"]
    a, loss_a = train_readout(tiny_adapter, spec, train_samples, progress=False)
    b, loss_b = train_readout(tiny_adapter, spec, train_samples, progress=False)
    assert loss_a == loss_b
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert loss_a[-1] < loss_a[0]


def test_maps_repeat_and_do_not_depend_on_seeds(trained, batch):
    pixels, text = batch
    first, again = trained.attribute(pixels, text, SEEDS), trained.attribute(pixels, text, [1, 2, 3])
    assert torch.equal(first.image, again.image) and torch.equal(first.text, again.text)
    assert first.image.shape == (3, *trained.adapter.image_size)
    assert torch.all(first.text[~first.token_mask] == 0)


def test_cache_hit_does_not_retrain_and_key_follows_every_setting(tiny_adapter, cache, monkeypatch):
    first = ensure_readouts(tiny_adapter, HP, progress=False)
    assert all(seconds is not None for _, seconds in first.values())
    stamps = {m: p.stat().st_mtime_ns for m, (p, _) in first.items()}
    monkeypatch.setattr("m2ib.pipeline.readout.train_and_cache", None)      # a retrain would now fail
    again = ensure_readouts(tiny_adapter, HP, progress=False)
    assert all(seconds is None for _, seconds in again.values())
    assert {m: p.stat().st_mtime_ns for m, (p, _) in again.items()} == stamps
    base = readout_specs(tiny_adapter, HP)["image"].path(tiny_adapter)
    for change in (dict(image_read_layers=[1]), dict(image_alpha="token"), dict(epochs=3), dict(image_beta=1.0),
                   dict(train_pairs=7), dict(train_seed=1), dict(image_layer=1)):
        assert readout_specs(tiny_adapter, {**HP, **change})["image"].path(tiny_adapter) != base, change
    other = tiny_adapter.copy()
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    assert readout_specs(other, HP)["image"].path(other) != base          # other weights, other readout


def test_missing_readout_is_refused_in_one_line(tiny_adapter, cache):
    with pytest.raises(InputError, match=r"no trained image readout .*make readout") as err:
        get_method("m2ib_readout", tiny_adapter, modalities=["image"], **HP)
    assert "\n" not in str(err.value)
    assert 'image_layer=0 text_layer=0 train_split=test train_pairs=6 batch_size=3 lr=0.01"' in str(err.value)


@pytest.mark.parametrize("change, match", [
    (dict(text_alpha="pixel"), "text_alpha must be one of"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(lr=-1.0), "lr must be > 0"),
    (dict(image_beta=-0.1), "image_beta must be a finite number"),
    (dict(image_read_layers=[0, "1"]), "image_read_layers must be a non-empty list"),
    (dict(text_read_layers=[2]), "valid bottleneck layers are 0..1"),
    (dict(image_layer=5), "valid bottleneck layers are 0..1"),
    (dict(epoch=2), "unknown parameter"),
])
def test_bad_settings_are_refused_in_one_line(tiny_adapter, cache, change, match):
    with pytest.raises(InputError, match=match) as err:
        ReadoutAttributor(tiny_adapter, **{**HP, **change})
    assert "\n" not in str(err.value)


def test_train_and_cache_writes_what_the_attributor_loads(tiny_adapter, cache, train_samples, batch):
    spec = readout_specs(tiny_adapter, HP, ("text",))["text"]
    path = train_and_cache(tiny_adapter, spec, train_samples, progress=False)
    att = get_method("m2ib_readout", tiny_adapter, modalities=["text"], progress=False, **HP)
    assert att.paths["text"] == path and att.identity()["text_readout"] == path.name
    net, _ = train_readout(tiny_adapter, spec, train_samples, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(att.nets["text"].state_dict().values(), net.state_dict().values()))


@pytest.fixture(scope="module")
def hf_adapter(tmp_path_factory):
    """The tiny timm ViT + HF BERT model (another adapter family: BERT pools [CLS], no causal mask)."""
    import open_clip
    from m2ib.models.sources import load_adapter
    from tiny_models import write_tiny_hf_model
    open_clip.add_model_config(write_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf_readout"),
                                                   name="m2ib-readout-timm-bert"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_adapter("m2ib-readout-timm-bert", pretrained=None, seed=0)


def test_other_adapter_family(hf_adapter, pairs, cache, train_samples):
    """Train, cache and explain on the timm + BERT towers: one-pass states equal prefix(), the map is the
    capacity of the readout's alpha."""
    pixels, text = hf_adapter.preprocess(pairs[0]), hf_adapter.tokenize(pairs[1])
    for modality, inputs in (("image", pixels), ("text", text)):
        states = hidden_states(hf_adapter, modality, inputs, [0, 1])
        for layer, state in states.items():     # tolerance: as in test_one_pass_hidden_states_equal_prefix
            torch.testing.assert_close(state, hf_adapter.prefix(modality, inputs, layer), rtol=1e-5, atol=1e-5)
    for spec in readout_specs(hf_adapter, HP).values():
        train_and_cache(hf_adapter, spec, train_samples, progress=False)
    method = get_method("m2ib_readout", hf_adapter, progress=False, **HP)
    att = method.attribute(pixels, text, SEEDS)
    feats, _ = method.pair_features(pixels, text)
    with torch.no_grad():
        cap = {m: (capacity(lambdas(method.nets[m], f), f.hidden) * f.valid[..., None]).sum(-1) for m, f in feats.items()}
    assert torch.equal(att.image, normalise_minmax(hf_adapter.hidden_to_image_map(cap["image"])))
    assert torch.equal(att.text, hf_adapter.hidden_to_text_scores(cap["text"], text) * att.token_mask)


def test_hidden_states_without_per_block_records(tiny_adapter, batch, monkeypatch):
    """Adapters that do not report per-block outputs get one prefix() per layer (the same tensors)."""
    monkeypatch.setattr(tiny_adapter, "supports_attention_parts", False)
    states = hidden_states(tiny_adapter, "image", batch[0], [0, 1])
    assert all(torch.equal(s, tiny_adapter.prefix("image", batch[0], l)) for l, s in states.items())
