"""The M2IB method in one place: the per-pair bottleneck (bottleneck.py), the Attributor that applies
it to both modalities (attributor.py) and the plain restatement of the release it is tested against
(reference.py). Importing this package registers method 'm2ib'."""
from m2ib.method.attributor import M2IBAttributor
from m2ib.method.bottleneck import M2IBConfig, ModalityConfig

__all__ = ["M2IBAttributor", "M2IBConfig", "ModalityConfig"]
