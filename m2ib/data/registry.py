"""Data sets by name: each loader (a module in m2ib/data/) registers itself with @register_dataset(name); a data config
(conf/data/<name>.yaml) holds `kind: <name>`, the loader's keyword arguments, and the run's
sharding keys (shard, num_shards), which the pipeline applies to every data set alike."""
from __future__ import annotations

import inspect
from typing import Callable

from m2ib.core.errors import InputError
from m2ib.core.registry import Registry

DATASETS: Registry[Callable] = Registry("data set", discover=("m2ib.data",))
#: Keys of a data config that belong to the run, not to the loader.
RUN_KEYS = ("kind", "shard", "num_shards")


def register_dataset(name: str):
    """Function decorator: loader(**config keys, progress=...) -> list[Sample]."""
    def wrap(fn):
        DATASETS.register(name, fn)
        return fn
    return wrap


def loader_params(cfg: dict) -> tuple[Callable, dict]:
    """(the loader of cfg['kind'], its keyword arguments) after refusing unknown or missing keys."""
    kind = cfg.get("kind")
    fn = DATASETS.get(kind)
    params = {k: v for k, v in cfg.items() if k not in RUN_KEYS}
    sig = inspect.signature(fn).parameters
    unknown = sorted(set(params) - set(sig) | ({"progress"} & set(params)))
    if unknown:
        raise InputError(f"data set {kind!r}: unknown key(s) {unknown}; known: {sorted(set(sig) - {'progress'})}")
    missing = [n for n, p in sig.items() if p.default is p.empty and n not in params]
    if missing:
        raise InputError(f"data set {kind!r}: missing key(s) {missing} (data.<key>=...)")
    return fn, params


def load_dataset(cfg: dict, progress: bool = True) -> list:
    fn, params = loader_params(cfg)
    return fn(**params, progress=progress)
