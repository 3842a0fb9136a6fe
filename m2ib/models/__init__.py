"""Model adapters: the only code that knows a model family's internals (base.py is the interface),
and model loading as resolve(name, pretrained) -> ModelSource -> build(source) (sources.py)."""
from m2ib.models.base import ModelAdapter
from m2ib.models.sources import ModelSource, build, load_adapter, resolve

__all__ = ["ModelAdapter", "ModelSource", "build", "load_adapter", "resolve"]
