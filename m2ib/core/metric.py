"""The Metric contract and its registry.

A metric is one function `score(attribution, adapter, samples, context, **params) -> rows` (a
DataFrame with sample_id, method and modality columns plus its value columns), registered with its
name, the value columns a table aggregates, and how its rows are tabulated:
- `table=None`: rows join the run's main table, one row per (sample, method, modality), each value
  column aggregated as mean + bootstrap interval;
- `table=writer`: the metric's rows form a table of their own, written by writer(rows, out_dir, stem)
  (e.g. the sanity check's per-layer curves).
`whole_dataset=True` refuses sharded runs (the metric's result depends on the whole evaluated set).
`curves=(name, ...)`: columns of the rows whose cells are 1-D arrays (one curve per pair, equal length
within a method and modality, e.g. the similarity after each deletion step); they stay out of the table
and its per-pair rows, and the pipeline writes their mean and bootstrap interval per step
(<stem>.<metric>-curves.csv) and one figure per curve (m2ib.pipeline.curves), its axes labelled by
`curve_axes` (x: what a step removes or inserts, y: the value tracked).
The keyword defaults of `score` are the metric's parameters: their types are checked before any model
or data is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from m2ib.core.attributor import AttributeFn
from m2ib.core.registry import Registry, check_params, signature_defaults

#: Every metric, by name; entries live in `metrics/`.
METRICS: Registry["MetricSpec"] = Registry("metric", discover=("metrics",))


@dataclass
class MetricContext:
    """What a metric may need beyond the attribution: the same method as a function of the model (to
    re-run it on a randomised or fine-tuned copy), the run seed, a folder for resumable work, progress."""

    attribute: Optional[AttributeFn] = None
    #: the method holds state fitted to this model's weights (a trained readout), so re-running it on a
    #: modified copy would not be the same method (Attributor.fitted_to_weights)
    fitted_to_weights: bool = False
    seed: int = 0
    work_dir: Optional[Path] = None
    progress: bool = False


@dataclass
class MetricSpec:
    name: str
    score: Callable
    columns: tuple[str, ...]
    table: Optional[Callable] = None
    whole_dataset: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    curves: tuple[str, ...] = ()
    curve_axes: tuple[str, str] = ("fraction removed", "similarity")

    def check_params(self, params: dict) -> dict:
        return check_params(f"metric {self.name!r}", params or {}, self.defaults)


def register_metric(name: str, columns: Sequence[str], table: Optional[Callable] = None,
                    whole_dataset: bool = False, curves: Sequence[str] = (),
                    curve_axes: tuple[str, str] = ("fraction removed", "similarity")):
    """Function decorator: register score(attribution, adapter, samples, context, **params) as a metric."""
    def wrap(fn):
        METRICS.register(name, MetricSpec(name, fn, tuple(columns), table, whole_dataset,
                                          signature_defaults(fn, skip=4), tuple(curves), tuple(curve_axes)))
        return fn
    return wrap


def table_columns(names=None) -> list[str]:
    """The value columns that tables aggregate, of the named metrics (default: every registered one) in
    order; own-table metrics (sanity) excluded."""
    specs = [METRICS.get(n) for n in (METRICS.names() if names is None else names)]
    return [c for spec in specs if spec.table is None for c in spec.columns]
