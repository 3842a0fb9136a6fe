"""Hydra entry point: `python scripts/run.py experiment=table1 [overrides]` (see conf/ and README)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from m2ib.core.errors import M2IBError

log = logging.getLogger("m2ib")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from m2ib.pipeline.experiment import Interrupted, run_experiment
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run_experiment(resolved, run_dir=run_dir)
    except Interrupted as exc:            # Ctrl-C: one line saying what is kept
        log.error("%s", exc)
        sys.exit(130)
    except M2IBError as exc:              # a clear message, not a traceback
        log.error("%s", exc)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise                         # let the sweep report this job and go on deciding for itself
        sys.exit(2)
    paths = result["paths"]
    for key in ("md", "sanity_spearman"):
        if key in paths:
            print(Path(paths[key]).with_suffix(".md").read_text())
    print("written:\n  " + "\n  ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
