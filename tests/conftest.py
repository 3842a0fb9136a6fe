"""Shared fixtures: the tiny random open_clip model and a few deterministic image-caption pairs."""
import numpy as np
import pytest
import torch
from PIL import Image

# One torch thread per test process: `make test` runs two pytest-xdist workers on the 2-core machines,
# and oversubscribed OpenMP threads busy-wait against each other.
torch.set_num_threads(1)


def pytest_configure(config):
    """Generate the embedded test split once, in the controller, before xdist workers start."""
    if not hasattr(config, "workerinput"):
        from m2ib.data.embedded import ensure_split
        ensure_split("test", progress=False)


@pytest.fixture(scope="session")
def tiny_adapter():
    from m2ib.models.sources import load_adapter
    return load_adapter("m2ib-tiny-vit", pretrained=None, seed=0)


@pytest.fixture(scope="session")
def adapter(tiny_adapter):
    """The same tiny model under the name the metric tests use (files may override it, e.g. embedded)."""
    return tiny_adapter


@pytest.fixture(scope="session")
def pairs():
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40 + 7 * i, 50, 3)) * 255).astype("uint8")) for i in range(3)]
    captions = ["a red circle", "a big blue square on the left of the picture", "green"]
    return images, captions
