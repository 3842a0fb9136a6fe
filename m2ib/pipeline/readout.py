"""Training the readouts of method m2ib_readout where they are missing: the pipeline layer loads the
training pairs from the readout's config (conf/ of the checkout or of the installed copy) and
m2ib.method.readout trains and caches."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from m2ib.core.attributor import MODALITIES
from m2ib.core.errors import InputError
from m2ib.core.paths import config_dir
from m2ib.data.registry import load_dataset
from m2ib.method.readout import readout_specs, train_and_cache
from m2ib.pipeline.experiment import build_adapter

CONF = config_dir()


def conf_hparams(overrides=()) -> dict:
    """conf/method/m2ib_readout.yaml's settings (what Hydra runs use) with key=value overrides (YAML values)."""
    hparams = yaml.safe_load((CONF / "method" / "m2ib_readout.yaml").read_text())["m2ib_readout"]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r} is not key=value")
        hparams[key] = yaml.safe_load(value)
    return hparams


def conf_adapter(model: str, device: str = "cpu"):
    """The adapter of conf/model/<model>.yaml."""
    path = CONF / "model" / f"{model}.yaml"
    if not path.is_file():
        raise InputError(f"no model config {path}; choose one of {sorted(p.stem for p in path.parent.glob('*.yaml'))}")
    return build_adapter(yaml.safe_load(path.read_text()), device)[0]


def ensure_readouts(adapter, hparams: dict, modalities=MODALITIES, retrain: bool = False,
                    progress: bool = True) -> dict[str, tuple[Path, float | None]]:
    """modality -> (cache file, training seconds or None for a cache hit); trains what is missing
    (or everything with retrain) on the spec's train_data / train_split / first train_pairs pairs."""
    out = {}
    for modality, spec in readout_specs(adapter, hparams, tuple(modalities)).items():
        path = spec.path(adapter)
        if path.is_file() and not retrain:
            out[modality] = (path, None)
            continue
        samples = load_dataset({"kind": spec.train_data, "split": spec.train_split, "limit": spec.train_pairs},
                               progress=False)
        start = time.perf_counter()
        train_and_cache(adapter, spec, samples, progress=progress)
        out[modality] = (path, time.perf_counter() - start)
    return out
