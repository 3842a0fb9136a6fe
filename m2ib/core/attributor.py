"""The one contract every attribution method implements, its registry, and the one batching loop.

An Attributor gets a batch already in the model's input form (preprocessed pixels and a TextBatch, on
the adapter's device) plus one seed per pair, and returns an Attribution. `attribute` is a template
method: it checks the batch, times the work, masks token scores to the word tokens, checks the shapes
and records meta for EVERY method (M2IB included); a method only writes `explain`.

Seeds are per pair (m2ib.core.seeds.pair_seed of the run seed and the sample id), and
`attribute_in_batches` is the only loop that turns Samples into batches: explain(), the pipeline and
the metrics all go through it, so the same pair, seed and hyperparameters give the same map everywhere.
"""
from __future__ import annotations

import abc
import inspect
import re
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch

from m2ib.core.errors import InputError
from m2ib.core.geometry import InputFrame
from m2ib.core.progress import progress_bar
from m2ib.core.records import Attribution, Sample, TextBatch, concat_attributions
from m2ib.core.registry import Registry, check_params
from m2ib.core.seeds import pair_seed

MODALITIES = ("image", "text")

#: Every method, by name. Entries live in the M2IB subpackage and in `baselines/`.
METHODS: Registry[type["Attributor"]] = Registry("attribution method", discover=("m2ib.method", "baselines"))

#: Hyperparameters every method accepts, besides its own `defaults`.
COMMON_DEFAULTS: dict[str, Any] = {
    "modalities": ["image", "text"],   # which maps to compute; the other one is None
    "progress": True,                  # tqdm bars on a method's inner per-pair loops (terminal only)
}


class Attributor(abc.ABC):
    """Explains the cosine similarity of each image-text pair, per modality.

    Subclasses set `name` (by @register_method), `defaults` (documented hyperparameters and their
    types), optionally `check_values` (range checks needing no model) and `setup` (checks needing the
    model), and implement `explain`.
    """

    name: str = "?"
    defaults: dict[str, Any] = {}
    #: True where the method holds state fitted to one model's weights (a trained readout): it cannot be
    #: re-run on modified weights, as the sanity check's randomised copies would need
    fitted_to_weights: bool = False

    def __init__(self, adapter, **hparams):
        self.adapter = adapter
        self.label = self.name      # what rows, tables and figures call it (get_method: a variant's label)
        self.hparams = self.check_params(hparams)
        mods = self.hparams["modalities"]
        self.modalities = (mods,) if isinstance(mods, str) else tuple(mods)
        self.setup()

    # ---- parameters ---------------------------------------------------------------------------
    @classmethod
    def check_params(cls, hparams: dict) -> dict:
        """Defaults merged with `hparams` after type and range checks that need no model; used before
        any model is loaded (fail fast) and again by __init__."""
        merged = check_params(f"method {cls.name!r}", hparams, {**COMMON_DEFAULTS, **cls.defaults})
        mods = merged["modalities"]
        mods = (mods,) if isinstance(mods, str) else tuple(mods)
        if not mods or any(m not in MODALITIES for m in mods):
            raise InputError(f"method {cls.name!r}: modalities must be a non-empty subset of {MODALITIES}, "
                             f"got {merged['modalities']!r}")
        cls.check_values(merged)
        return merged

    @classmethod
    def check_values(cls, hparams: dict) -> None:
        """Raise InputError for a value out of range (no model needed)."""

    def setup(self) -> None:
        """Checks and set-up that need the model (called once, at construction)."""

    def identity(self) -> dict:
        """The resolved hyperparameters that determine the maps (the attribution cache's key)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items() if k != "progress"}

    def with_context(self, attribution: Attribution, samples: Sequence[Sample]) -> Attribution:
        """`attribution` (rows = samples, in order) with what figures need: the samples themselves (in
        memory only), the model's input frame and these hyperparameters."""
        attribution.method = self.label
        attribution.samples = list(samples)
        attribution.frame = InputFrame.of(self.adapter)
        attribution.hparams = self.identity()
        return attribution

    # ---- the method -------------------------------------------------------------------------------
    @abc.abstractmethod
    def explain(self, pixels: torch.Tensor, text: TextBatch, seeds: list[int]) -> tuple[
            Optional[torch.Tensor], Optional[torch.Tensor], dict]:
        """(image (B, H, W) in the preprocessed frame or None, text (B, T) on the TextBatch positions
        or None, extra per-row meta) for the modalities in self.modalities."""

    # ---- the template -----------------------------------------------------------------------------
    def attribute(self, pixels: torch.Tensor, text: TextBatch, seeds: Sequence[int]) -> Attribution:
        """(B, 3, H, W) pixels, a B-row TextBatch and B seeds -> Attribution with B rows."""
        seeds = check_batch(self.adapter, pixels, text, seeds, self.name)
        start = time.perf_counter()
        image, scores, meta = self.explain(pixels, text, seeds)
        if ("image" in self.modalities) != (image is not None) or ("text" in self.modalities) != (scores is not None):
            raise RuntimeError(f"{self.name}: explained {['image'] * (image is not None) + ['text'] * (scores is not None)}"
                               f" but was asked for {list(self.modalities)}")
        if image is not None:
            image = image.detach().float()
            expect = (pixels.shape[0], *self.adapter.image_size)
            if tuple(image.shape) != expect:
                raise RuntimeError(f"{self.name}: image map has shape {tuple(image.shape)}, expected {expect}")
            image = image.cpu()
        if scores is not None:
            scores = scores.detach().float()
            if tuple(scores.shape) != tuple(text.ids.shape):
                raise RuntimeError(f"{self.name}: text scores have shape {tuple(scores.shape)}, "
                                   f"expected {tuple(text.ids.shape)}")
            scores = (scores * text.word_mask.to(scores.device)).cpu()
        seconds = time.perf_counter() - start
        return Attribution(method=self.label, image=image, text=scores, tokens=text.tokens,
                           token_mask=text.word_mask.cpu(), seconds=seconds,
                           meta={"seeds": list(seeds), "truncated": list(text.truncated), **meta})


def register_method(name: str):
    """Class decorator: make an Attributor constructible by name (get_method)."""
    def wrap(cls):
        cls.name = name
        return METHODS.register(name, cls)
    return wrap


def available_methods() -> list[str]:
    return METHODS.names()


#: A method entry is a registered name or a variant `<name>-<label>` of one (e.g. m2ib-iba): one run can
#: hold a method several times with different hyperparameters; rows, tables and figures carry the variant's
#: name, while the attribution cache is keyed by the registered method and its resolved hyperparameters.
VARIANT_SEPARATOR = "-"
_VARIANT_LABEL = re.compile(r"[A-Za-z0-9_.]+")


def registered_name(entry: str) -> str:
    """The registered method a method entry runs: `entry` itself, or NAME of a variant NAME-LABEL."""
    if not isinstance(entry, str) or not entry:
        raise InputError(f"a method must be named by a string, got {entry!r}")
    if entry in METHODS:
        return entry
    base, sep, label = entry.partition(VARIANT_SEPARATOR)
    if sep and base in METHODS and _VARIANT_LABEL.fullmatch(label):
        return base
    raise InputError(f"unknown method {entry!r}; available: {', '.join(METHODS.names())} (a variant of one, "
                     f"with its own hyperparameters, is <method>{VARIANT_SEPARATOR}<label>, e.g. "
                     f"m2ib{VARIANT_SEPARATOR}iba; the label uses letters, digits, '_' and '.')")


def method_class(entry: str) -> type:
    """The Attributor class a method entry (a name or a variant) constructs."""
    return METHODS.get(registered_name(entry))


def get_method(entry: str, adapter, **hparams) -> Attributor:
    """The Attributor of a method entry (a registered name or a variant NAME-LABEL), labelled `entry`."""
    attributor = method_class(entry)(adapter, **hparams)
    attributor.label = entry
    return attributor


# ---- input checks ---------------------------------------------------------------------------------
def check_batch(adapter, pixels, text, seeds, method: str) -> list[int]:
    """Reject a batch whose parts do not fit together, naming the offending input."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InputError(f"{method}: pixels must be a (B, 3, H, W) tensor, got {shape}")
    if tuple(pixels.shape[-2:]) != tuple(adapter.image_size):
        raise InputError(f"{method}: pixels are {tuple(pixels.shape[-2:])} but model {adapter.name} "
                         f"expects preprocessed images of {tuple(adapter.image_size)}; use adapter.preprocess")
    if not isinstance(text, TextBatch):
        raise InputError(f"{method}: text must be a TextBatch (adapter.tokenize), got {type(text).__name__}")
    if len(text) != pixels.shape[0]:
        raise InputError(f"{method}: {pixels.shape[0]} images but {len(text)} captions")
    seeds = list(seeds)
    if len(seeds) != pixels.shape[0]:
        raise InputError(f"{method}: {pixels.shape[0]} pairs need {pixels.shape[0]} seeds (one per pair), "
                         f"got {len(seeds)}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) and not (hasattr(s, "__index__")):
            raise InputError(f"{method}: seed of pair {i} must be an integer, got {s!r}")
        if not 0 <= int(s) < 2 ** 63:
            raise InputError(f"{method}: seed of pair {i} must be in [0, 2**63), got {s!r}")
    return [int(s) for s in seeds]


# ---- the one batching loop ------------------------------------------------------------------------
def attribute_in_batches(attributor: Attributor, samples: Sequence[Sample], seed: int = 0, batch_size: int = 8,
                         progress: bool = False, on_batch: Callable | None = None) -> Attribution:
    """Run `attributor` over Samples batch by batch with pair seeds pair_seed(sample.id, seed).

    on_batch(chunk, attribution) is called as each batch finishes (e.g. to cache it at once).
    Returns one Attribution over all samples, rows in order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    samples = list(samples)
    if not samples:
        raise InputError("no samples to attribute")
    adapter, parts = attributor.adapter, []
    bar = progress_bar(total=len(samples), desc=attributor.label, unit="pair", enabled=progress)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        try:
            pixels = adapter.preprocess([s.image for s in chunk])
            text = adapter.tokenize([s.caption for s in chunk])
            att = attributor.attribute(pixels, text, [pair_seed(s.id, seed) for s in chunk])
        except InputError as exc:
            raise InputError(f"{attributor.label} on samples {[s.id for s in chunk]} (image/caption numbers "
                             f"count within this list): {exc}") from exc
        if on_batch is not None:
            on_batch(chunk, att)
        parts.append(att)
        bar.update(len(chunk))
    bar.close()
    return attributor.with_context(concat_attributions(parts), samples)


# ---- a method as a function of the model ----------------------------------------------------------
AttributeFn = Callable[[Any, Sequence[Sample]], Attribution]


def attribute_with(method: Union[str, Callable], batch_size: int = 8, seed: int = 0, progress: bool = False,
                   hparams: Optional[dict] = None) -> AttributeFn:
    """attribute(adapter, samples) running a method through attribute_in_batches.

    ROAR+ and the sanity checks re-run a method on other weights (a fine-tuned or randomised copy),
    so they take a function of the adapter. method: a registered name (built with its `hparams`) or a
    factory adapter -> Attributor.
    """
    hparams = dict(hparams or {})
    if isinstance(method, str):
        method_class(method).check_params(hparams)

    def attribute(adapter, samples: Sequence[Sample]) -> Attribution:
        attributor = get_method(method, adapter, **hparams) if isinstance(method, str) else method(adapter)
        return attribute_in_batches(attributor, samples, seed, batch_size, progress)

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
    return attribute_with(attribute) if len(required) == 1 else attribute
