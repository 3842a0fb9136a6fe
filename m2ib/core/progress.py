"""The one progress-bar rule for long steps (model load, data generation, each method, each metric):
a tqdm bar on stderr while `enabled` (the run's `progress` setting) AND stderr is a terminal, so logs,
CI output and notebooks stay free of carriage-return noise."""
from __future__ import annotations

from typing import Iterable, Optional

from tqdm import tqdm


def progress_bar(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None,
                 enabled: bool = True, unit: str = "it", leave: bool = False) -> tqdm:
    """tqdm(iterable) shown only on a terminal (tqdm's disable=None) and only when enabled."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=None if enabled else True,
                dynamic_ncols=True)
