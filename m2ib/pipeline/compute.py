"""Compute a method's attributions for a list of samples, resuming from the cache."""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

from m2ib.core.attributor import Attributor, attribute_in_batches
from m2ib.core.errors import InputError
from m2ib.core.records import Attribution, Sample
from m2ib.pipeline.cache import AttributionCache

log = logging.getLogger(__name__)


def compute_attributions(attributor: Attributor, samples: Sequence[Sample], cache_root, model_identity: dict,
                         seed: int = 0, batch_size: int = 8, progress: bool = True,
                         on_batch: Optional[Callable] = None) -> Attribution:
    """Attributions of `attributor` for `samples` (in order), computing only those not cached yet.

    The cache is keyed by the attributor's resolved hyperparameters (Attributor.identity); pair seeds
    come from the sample id (m2ib.core.seeds.pair_seed), so results do not depend on batching, sharding
    or on which samples were already cached, and equal what explain() gives for the same ids.
    on_batch(chunk, attribution) is called after each computed batch is cached (progress accounting).
    """
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise InputError("sample ids are not unique; the cache needs unique ids")
    name = attributor.name
    cache = AttributionCache(cache_root, name, {"model": model_identity, "params": attributor.identity(), "seed": seed})
    todo = cache.missing(samples)
    if todo:
        log.info("%s: computing %d of %d samples (%d cached) into %s", name, len(todo), len(samples),
                 len(samples) - len(todo), cache.dir)
        def store(chunk, attribution):
            cache.put(chunk, attribution)
            if on_batch is not None:
                on_batch(chunk, attribution)
        attribute_in_batches(attributor, todo, seed=seed, batch_size=batch_size, progress=progress, on_batch=store)
    else:
        log.info("%s: all %d samples cached in %s", name, len(samples), cache.dir)
    return attributor.with_context(cache.get(samples), samples)
