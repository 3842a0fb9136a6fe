"""m2ib-bench: attribution methods (M2IB and its rivals) on CLIP-like models, scored and tabulated.

Layers, bottom to top (tests/test_architecture.py keeps the direction):
  m2ib.core      records, errors, registries, the seed rule, map normalisation, the Attributor/Metric contracts
  m2ib.models    model adapters and model sources (the only code that reads model internals)
  m2ib.data      data sets (imports only m2ib.core)
  m2ib.method    the M2IB method; baselines/ and metrics/ sit beside it
  m2ib.pipeline  configured runs, the attribution cache, tables, figures
  m2ib.api       explain()
  m2ib.cli       the `m2ib-bench` command (Hydra; configs in conf/, shipped in the wheel as m2ib/conf)

`m2ib.explain` and `m2ib.load_adapter` are imported on first use, so `import m2ib` stays cheap.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("m2ib-bench")
except _metadata.PackageNotFoundError:   # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"

__all__ = ["explain", "load_adapter", "__version__"]


def __getattr__(name: str):
    if name == "explain":
        from m2ib.api import explain as value
    elif name == "load_adapter":
        from m2ib.models.sources import load_adapter as value
    else:
        raise AttributeError(f"module 'm2ib' has no attribute {name!r}")
    globals()[name] = value
    return value
