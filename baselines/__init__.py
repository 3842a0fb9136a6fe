"""Attribution baselines on the shared Attributor interface (gradient, perturbation, attention,
random). Importing this package imports every module in it, and each module registers its methods by
name (m2ib.core.attributor.METHODS): a new baseline is one module here plus one conf/method/*.yaml.
All explain the pair's cosine similarity (see base)."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
