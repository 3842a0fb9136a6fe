"""One configured run: model x data x methods x metrics -> per-sample rows -> versioned tables.

Nothing here knows a particular method, metric, data set or model: each is looked up in its registry
(m2ib.core.attributor.METHODS, m2ib.core.metric.METRICS, m2ib.data.registry.DATASETS,
m2ib.models.sources.MODEL_SOURCES). Everything that can be checked without a model is checked first
(validate_config), and every method is constructed before any is run, so a bad parameter is reported
in one line before minutes of work.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from m2ib.core.attributor import attribute_with, get_method, method_class
from m2ib.core.errors import InputError, M2IBError
from m2ib.core.figures import method_grid, save_figure
from m2ib.core.geometry import InputFrame
from m2ib.core.metric import METRICS, MetricContext, table_columns
from m2ib.core.progress import progress_bar
from m2ib.core.registry import check_params
from m2ib.data.registry import load_dataset, loader_params
from m2ib.models.sources import build, resolve
from m2ib.pipeline.compute import compute_attributions
from m2ib.pipeline.curves import write_curves
from m2ib.pipeline.metric_cache import MetricRowsCache
from m2ib.pipeline.provenance import (check_overwrite, check_publishable, data_fingerprint, git_state,
                                      result_identity, run_metadata)
from m2ib.pipeline.report import input_cells, method_cells, report_settings, write_report
from m2ib.pipeline.tables import aggregate, write_meta, write_table

log = logging.getLogger(__name__)
GROUP_BY = ["method", "modality"]
ROW_KEYS = ["sample_id", "method", "modality"]


def build_adapter(model_cfg: dict, device: str, progress: bool = False):
    """The adapter named by a model config; returns (adapter, identity used as cache key: what names the
    model plus the digest of the weights it loaded, whatever their source).

    model.m2ib (optional) overrides the model description's M2IB layers/betas, e.g. for a checkpoint
    fine-tuned on another domain (conf/model/local_checkpoint.yaml)."""
    with progress_bar(total=1, desc=f"loading model {model_cfg['name']}", unit="model", enabled=progress) as bar:
        source = resolve(model_cfg["name"], model_cfg.get("pretrained"))
        adapter = build(source, device=device)
        bar.update()
    adapter.m2ib_defaults.update(model_cfg.get("m2ib") or {})
    return adapter, {**source.identity(), "weights": adapter.weights_digest()}


def load_samples(data_cfg: dict, progress: bool = True) -> tuple[list, int]:
    """(this job's shard of the configured data set's samples: every num_shards-th pair, total count)."""
    samples = load_dataset(data_cfg, progress=progress)
    shard, num = int(data_cfg.get("shard", 0)), int(data_cfg.get("num_shards", 1))
    return samples[shard::num], len(samples)


def table_stem(cfg: dict, n: int) -> str:
    """File name of a table, saying what produced it: experiment, model, data set, split, n (the data
    set's size before sharding) and the result identity (a hash of the methods, metrics, their
    hyperparameters, model, data selection and seed), so two configurations never share a file; every
    shard of one run shares the stem merge_shards.py joins."""
    name = cfg["model"]["name"]      # a JSON config path (an in-house architecture) shows as its file name
    model = (Path(name).stem if name.lower().endswith(".json") else name).replace("/", "_").replace(":", "_")
    data = cfg["data"]["kind"] + (f"-{cfg['data']['split']}" if cfg["data"].get("split") else "")
    stem = f"{cfg['experiment_name']}-{model}-{data}-n{n}-{result_identity(cfg)}"
    if int(cfg["data"].get("num_shards", 1)) > 1:
        stem += f"-shard{cfg['data']['shard']}of{cfg['data']['num_shards']}"
    return stem


def check_run_settings(cfg: dict) -> None:
    """Reject run settings of the wrong type or range with a message naming the config key."""
    def integer(key, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{key} must be an integer >= {low}, got {value!r}")
    integer("seed", cfg.get("seed", 0), 0)
    integer("batch_size", cfg.get("batch_size", 8), 1)
    if cfg.get("threads") is not None:
        integer("threads", cfg["threads"], 1)
    data = cfg.get("data") or {}
    integer("data.num_shards", data.get("num_shards", 1), 1)
    integer("data.shard", data.get("shard", 0), 0)
    if data.get("shard", 0) >= data.get("num_shards", 1):
        raise InputError(f"data.shard must be in 0..num_shards-1, got shard={data.get('shard')}, "
                         f"num_shards={data.get('num_shards')}")
    if data.get("limit") is not None:
        integer("data.limit", data["limit"], 1)
    device = str(cfg.get("device", "cpu"))
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise InputError(f"device must be cpu, cuda or cuda:<index>, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device=cuda was asked for but no CUDA device is available; use device=cpu")


def validate_config(cfg: dict) -> None:
    """Every check that needs no model or data: run settings, each method's and metric's parameters
    (unknown keys, types, ranges, non-finite numbers), the data set's keys, sharding."""
    check_run_settings(cfg)
    for key in ("publish", "allow_dirty", "write_results", "figures", "progress"):
        if not isinstance(cfg.get(key, False), bool):
            raise InputError(f"{key} must be true or false, got {cfg.get(key)!r}")
    methods, metrics_cfg = cfg.get("method") or {}, cfg.get("metric") or {}
    if not methods or not metrics_cfg:
        raise InputError("a run needs at least one method (method=[...]) and one metric (metric=[...])")
    for name, params in methods.items():
        method_class(name).check_params(params or {})
    for name, params in metrics_cfg.items():
        spec = METRICS.get(name)
        spec.check_params(params or {})
        if spec.whole_dataset and int((cfg.get("data") or {}).get("num_shards", 1)) > 1:
            raise InputError(f"metric {name!r} needs the whole data set in one job (its result depends on every "
                             f"evaluated pair); run it with data.num_shards=1")
    loader_params(cfg["data"])
    report_settings(cfg.get("report"))
    check_model_config(cfg.get("model") or {})


#: The keys of a model config (conf/model/*.yaml) and their types; `m2ib` overrides the model's M2IB settings.
MODEL_KEYS = {"name": "", "pretrained": None, "finetune_lr": 1e-5, "m2ib": None}
M2IB_SETTING_KEYS = {"image_layer": 0, "text_layer": 0, "image_beta": 0.1, "text_beta": 0.1}


def check_model_config(model: dict) -> None:
    check_params("model config", model, MODEL_KEYS)
    if not model.get("name"):
        raise InputError("model.name must be set (e.g. model=embedded, or model.name=ViT-B-32)")
    if model.get("pretrained") is not None and not isinstance(model["pretrained"], str):
        raise InputError(f"model.pretrained must be null, an open_clip tag or a file path, got {model['pretrained']!r}")
    if not isinstance(model.get("m2ib") or {}, dict):
        raise InputError(f"model.m2ib must be a mapping of {sorted(M2IB_SETTING_KEYS)}, got {model['m2ib']!r}")
    check_params("model.m2ib", model.get("m2ib") or {}, M2IB_SETTING_KEYS)


def score_cached(spec, params: dict, att, adapter, samples, context: MetricContext, cache_dir, data: str) -> tuple:
    """(rows, seconds it took to score them) of one metric for one method, read from the metric-rows
    cache where this exact scoring was finished before (an interrupted run resumes after it).
    data: data_fingerprint(samples), computed once per run."""
    cache = MetricRowsCache(cache_dir, att.meta.get("cache_key", att.method), att.method, spec.name, params, data)
    hit = cache.get()
    if hit is not None:
        log.info("%s: %s rows read from %s", att.method, spec.name, cache.path)
        return hit
    tic = time.perf_counter()
    rows = spec.score(att, adapter, samples, context, **params)
    seconds = time.perf_counter() - tic
    if not rows.empty:
        cache.put(rows, seconds)
    return rows, seconds


class Interrupted(M2IBError):
    """Ctrl-C during a run: says what is cached and that a re-run resumes."""


def output_dirs(cfg: dict, run_dir: Optional[Path]) -> list[Path]:
    """The run's own folder, plus <published_dir or results_dir>/<experiment_name> unless write_results=false."""
    out = [Path(run_dir)] if run_dir else []
    if cfg.get("write_results", True):
        root = cfg.get("published_dir", "results") if cfg.get("publish") else cfg.get("results_dir", "runs/tables")
        out.append(Path(root) / cfg["experiment_name"])
    return out


def run_experiment(cfg: dict, run_dir: Optional[Path] = None) -> dict:
    """Run a resolved config (a plain dict); returns {'rows', 'table', 'paths', <own-table metric>: rows}."""
    tally = _Tally()
    try:
        return _run(cfg, run_dir, tally)
    except KeyboardInterrupt:
        where = f" ({tally.pairs} pairs of {tally.method} computed and cached by this run)" if tally.method else ""
        raise Interrupted(f"interrupted: every finished batch of maps and every finished method's metric rows are "
                          f"cached under {cfg.get('cache_dir')}{where}; "
                          f"re-run the same command to resume from there") from None


class _Tally:
    """Which method is running and how many of its pairs this run has cached (for the Ctrl-C message)."""

    method, pairs = None, 0

    def start(self, method: str) -> None:
        self.method, self.pairs = method, 0

    def __call__(self, chunk, _attribution) -> None:
        self.pairs += len(chunk)


def _run(cfg: dict, run_dir: Optional[Path], tally: _Tally) -> dict:
    validate_config(cfg)
    state = git_state()
    check_publishable(cfg, state)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = cfg.get("device", "cpu")
    progress = bool(cfg.get("progress", True))
    seed, batch_size = int(cfg.get("seed", 0)), int(cfg.get("batch_size", 8))
    methods = {name: dict(params or {}) for name, params in cfg["method"].items()}
    specs = {name: (METRICS.get(name), METRICS.get(name).check_params(params or {}))
             for name, params in cfg["metric"].items()}
    adapter, identity = build_adapter(cfg["model"], device, progress)
    attributors = {name: get_method(name, adapter, **params) for name, params in methods.items()}
    samples, total = load_samples(cfg["data"], progress=progress)
    if not samples:
        raise InputError(f"no samples in data set {cfg['data']}")

    out_dirs = output_dirs(cfg, run_dir)
    stem = table_stem(cfg, total)
    for out in out_dirs:   # before any work: never overwrite another configuration's table
        check_overwrite(out / f"{stem}.meta.json", result_identity(cfg))
    pair_rows, own_rows, curve_rows, timings, examples = [], {}, {}, {}, {}
    report = report_settings(cfg.get("report"))
    thumbnails = {}
    data = data_fingerprint(samples)          # keys every (method, metric)'s cached rows
    for name, attributor in attributors.items():
        start = time.perf_counter()
        tally.start(name)
        att = compute_attributions(attributor, samples, cfg["cache_dir"], identity, seed=seed,
                                   batch_size=batch_size, progress=progress, on_batch=tally)
        timings[name] = {"wall_seconds": time.perf_counter() - start,
                         "seconds_per_pair_when_computed": att.seconds / len(samples)}
        examples[name] = att.select(range(min(4, len(samples))))
        if report["enabled"] and out_dirs:
            thumbnails[name] = method_cells(att, report)
        context = MetricContext(attribute=attribute_with(name, batch_size, seed, progress, hparams=methods[name]),
                                fitted_to_weights=attributor.fitted_to_weights, seed=seed,
                                work_dir=Path(cfg["cache_dir"]), progress=progress)
        merged = None
        for metric, (spec, params) in specs.items():
            rows, seconds = score_cached(spec, params, att, adapter, samples, context, cfg["cache_dir"], data)
            timings[name][f"{metric}_seconds_per_pair"] = seconds / len(samples)
            if rows.empty:
                continue
            if spec.table is not None:
                own_rows.setdefault(metric, []).append(rows)
                continue
            if spec.curves:   # per-step arrays: summarised apart, never in the table or its rows
                curve_rows.setdefault(metric, []).append(rows[ROW_KEYS + list(spec.curves)])
                rows = rows.drop(columns=list(spec.curves))
            rows = rows[ROW_KEYS + [c for c in rows.columns if c not in ROW_KEYS]]
            if merged is None:
                merged = rows
            else:   # one row per (sample, method, modality) holding every metric's values
                extra = [c for c in rows.columns if c not in ROW_KEYS and c not in merged.columns]
                merged = merged.merge(rows[ROW_KEYS + extra], on=ROW_KEYS, how="outer", sort=False)
        if merged is not None:
            pair_rows.append(merged)
    if not pair_rows and not own_rows:
        raise InputError("no metric produced rows (see the warnings above)")

    meta = {**run_metadata(cfg, samples, device, {"seed": seed, "bootstrap_seed": seed}, state), "timings": timings}
    result: dict = {"paths": {}}
    values = []
    if pair_rows:
        rows = pd.concat(pair_rows, ignore_index=True)
        values = [c for c in table_columns(specs) if c in rows.columns]
        table = aggregate(rows, GROUP_BY, values, seed=seed)
        for out in out_dirs:
            result["paths"] = write_table(table, rows, out, stem, GROUP_BY, values, meta)
            if cfg.get("figures", True):
                result["paths"]["examples"] = save_figure(method_grid(examples), out / f"{stem}.examples.png")
            log.info("wrote %s", result["paths"]["md"])
        result.update(rows=rows, table=table)
    for metric, frames in curve_rows.items():
        rows = pd.concat(frames, ignore_index=True)
        for out in out_dirs:
            spec = specs[metric][0]
            result["paths"].update(write_curves(rows, spec.curves, out, stem, metric, seed, spec.curve_axes))
        result[f"{metric}_curves"] = rows
    for metric, frames in own_rows.items():
        rows = pd.concat(frames, ignore_index=True)
        for out in out_dirs:
            result["paths"].update(specs[metric][0].table(rows, out, stem))
            write_meta(meta, out / f"{stem}.{metric}.meta.json")
        result[metric] = {"rows": rows}
    if report["enabled"] and out_dirs:
        inputs = input_cells(samples, InputFrame.of(adapter), report)
        figures = [p for key, p in result["paths"].items() if str(p).endswith(".png") and key != "examples"]
        for out in out_dirs:
            result["paths"]["report"] = write_report(
                out / f"{stem}.report.html", title=stem, samples=samples, inputs=inputs, cells=thumbnails,
                meta=meta, settings=report, table=result.get("table"), by=GROUP_BY,
                values=values,
                rows=result.get("rows"), figures=figures)
            log.info("wrote %s", result["paths"]["report"])
    return result
