"""Compute a method's attributions for a list of samples, resuming from the cache."""
from __future__ import annotations

import logging
from typing import Sequence

from m2ib.attributor import attribute_in_batches, get_method
from m2ib.errors import InputError
from m2ib.pipeline.cache import AttributionCache
from m2ib.types import Attribution, Sample

log = logging.getLogger(__name__)


def compute_attributions(adapter, method: str, params: dict, samples: Sequence[Sample], cache_root,
                         model_identity: dict, seed: int = 0, batch_size: int = 8,
                         progress: bool = True) -> Attribution:
    """Attributions of `method` for `samples` (in order), computing only those not cached yet.

    Pair seeds come from the sample id (m2ib.attributor.pair_seed), so results do not depend on
    batching, sharding or on which samples were already cached.
    """
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise InputError("sample ids are not unique; the cache needs unique ids")
    cache = AttributionCache(cache_root, method, {"model": model_identity, "params": dict(params), "seed": seed})
    todo = cache.missing(samples)
    if todo:
        log.info("%s: computing %d of %d samples (%d cached) into %s", method, len(todo), len(samples),
                 len(samples) - len(todo), cache.dir)
        attribute_in_batches(get_method(method, adapter, **params), todo, seed=seed, batch_size=batch_size,
                             progress=progress, on_batch=cache.put)
    else:
        log.info("%s: all %d samples cached in %s", method, len(samples), cache.dir)
    return cache.get(samples)
