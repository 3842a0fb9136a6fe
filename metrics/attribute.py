"""Turning any method into one callable, attribute(adapter, samples) -> Attribution.

ROAR+ and the sanity checks must re-run a method on other weights (a fine-tuned or randomised copy of
the model), so they take a function of the adapter rather than a finished Attribution. Any method
plugs in: a registered name, a factory `lambda adapter: get_method(name, adapter, **hp)`, or a plain
attribute(adapter, samples) function.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Union

from m2ib.errors import InputError
from m2ib.models.base import ModelAdapter
from m2ib.types import Attribution, Sample

AttributeFn = Callable[[ModelAdapter, Sequence[Sample]], Attribution]


def attribute_with(method: Union[str, Callable], batch_size: int = 8, seed: int = 0,
                   progress: bool = False, hparams: Optional[dict] = None, **more_hparams) -> AttributeFn:
    """attribute(adapter, samples) running an Attributor in batches.

    method: a registered method name (built with get_method(method, adapter, **hparams)) or a factory
    adapter -> Attributor. Pass the method's hyperparameters as `hparams` when one of them shares a
    name with this function's own arguments (several baselines have a `batch_size`).
    """
    hparams = {**(hparams or {}), **more_hparams}
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")

    def attribute(adapter: ModelAdapter, samples: Sequence[Sample]) -> Attribution:
        from m2ib.attributor import attribute_in_batches, concat_attributions, get_method
        samples = list(samples)
        if not samples:
            raise InputError("no samples to attribute")
        attributor = get_method(method, adapter, **hparams) if isinstance(method, str) else method(adapter)
        return concat_attributions(attribute_in_batches(attributor, samples, seed, batch_size, progress))

    return attribute


def resolve(attribute) -> AttributeFn:
    """Accept a method name, a factory adapter -> Attributor (one required argument), or an
    attribute(adapter, samples) function (two required arguments)."""
    if isinstance(attribute, str):
        return attribute_with(attribute)
    if not callable(attribute):
        raise InputError(f"attribute must be a method name or a callable, got {type(attribute).__name__}")
    try:
        params = inspect.signature(attribute).parameters.values()
    except (TypeError, ValueError):
        return attribute
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) == 1:
        return attribute_with(attribute)
    return attribute
