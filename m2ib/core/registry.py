"""One registry shape for every pluggable kind: methods, metrics, data sets and model sources.

An entry is registered by the module that defines it (a decorator), so adding a method, metric, data
set or model source is one module plus one YAML file under conf/. Each registry knows which packages
hold its entries (`discover`: packages whose every module is imported on first lookup, the way Python
entry points work), so a lookup by name works from any import order without the core importing them
statically, and a new module in such a package is found without editing any list.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from m2ib.core.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, with one-line errors that list what exists."""

    def __init__(self, kind: str, discover: Iterable[str] = ()):
        self.kind = kind
        self._discover = tuple(discover)
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise InputError(f"two {self.kind}s registered under the name {name!r}")
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for name in self._discover:
                package = importlib.import_module(name)
                for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
                    importlib.import_module(f"{name}.{module.name}")

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


# ---- typed parameters ---------------------------------------------------------------------------------
def check_params(owner: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """`defaults` updated with `given`, after refusing unknown keys and values whose type differs from
    the default's (bool, int, float, str, list; a None default accepts anything). Numbers must be
    finite. Every message names the owner and the key, so a misspelt override is one line."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InputError(f"{owner}: unknown parameter(s) {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **given}
    for key, value in given.items():
        default = defaults[key]
        if default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            want = "true or false"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
        elif isinstance(default, str):
            ok = isinstance(value, str)
            want = "a string"
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple, str))
            want = "a list"
        else:
            ok, want = True, ""
        if not ok:
            raise InputError(f"{owner}: parameter {key} must be {want}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{owner}: parameter {key} must be finite, got {value!r}")
    return merged


def signature_defaults(fn: Callable, skip: int) -> dict:
    """The keyword defaults of `fn` after its first `skip` positional parameters (a metric's params)."""
    import inspect
    out = {}
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if i < skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is p.empty:
            raise InputError(f"{fn.__qualname__}: parameter {p.name} needs a default")
        out[p.name] = p.default
    return out
