"""The `m2ib-bench` command (also `python scripts/run.py` in a checkout): one Hydra run of
m2ib.pipeline.experiment, e.g. `m2ib-bench experiment=table1 method=[m2ib,rise] data.limit=20`.

The configs are the checkout's conf/, or the same files shipped in the wheel as m2ib/conf
(m2ib.core.paths.config_dir), so the command works from any directory. `--help` starts with what can
be run: every registered method, metric and data set (the first sentence of its docstring) and every
model config (conf/model/*.yaml with its first comment line), through the `m2ib_catalogue` resolver
that conf/config.yaml's hydra.help header calls; `--hydra-help` is Hydra's own help.
"""
from __future__ import annotations

import inspect
import logging
import re
import shutil
import sys
from pathlib import Path

import hydra
import matplotlib
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from m2ib.core.errors import M2IBError
from m2ib.core.paths import config_dir

log = logging.getLogger("m2ib")
matplotlib.use("Agg")      # batch runs write figures to files; no window system needed or wanted
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z(])")


def summary(obj) -> str:
    """The first sentence of an object's docstring (its first paragraph, joined into one line)."""
    paragraph = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    end = _SENTENCE_END.search(paragraph)
    return paragraph[:end.end()] if end else paragraph


def model_summary(path: Path) -> str:
    """A model config's first comment line, else its name and weights."""
    lines = path.read_text().splitlines()
    comment = next((line.lstrip("# ").strip() for line in lines if line.startswith("#")), "")
    if comment:
        return comment
    cfg = OmegaConf.load(path)
    return f"{cfg.get('name')} (pretrained: {cfg.get('pretrained')})"


def catalogue(width: int | None = None) -> str:
    """What can be run, one line per entry: methods, models, data sets, metrics."""
    from m2ib.core.attributor import METHODS
    from m2ib.core.metric import METRICS
    from m2ib.data.registry import DATASETS
    sections = {
        "Methods (method=[a,b,...])": {n: summary(METHODS.get(n)) for n in METHODS.names()},
        "Models (model=...)": {p.stem: model_summary(p) for p in sorted((config_dir() / "model").glob("*.yaml"))},
        "Data sets (data=...)": {n: summary(DATASETS.get(n)) for n in DATASETS.names()},
        "Metrics (metric=[a,b,...])": {n: summary(METRICS.get(n).score) for n in METRICS.names()},
    }
    width = width or shutil.get_terminal_size((100, 20)).columns
    out = []
    for title, entries in sections.items():
        pad = max(map(len, entries)) + 2
        out.append(f"== {title} ==")
        for name, text in entries.items():
            room = max(width - pad - 2, 20)
            text = text if len(text) <= room else text[:room - 1].rsplit(" ", 1)[0] + "…"
            out.append(f"  {name.ljust(pad)}{text}")
        out.append("")
    return "\n".join(out).replace("$", "$$")   # Hydra fills its help template with string.Template


OmegaConf.register_new_resolver("m2ib_catalogue", catalogue, replace=True)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
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
