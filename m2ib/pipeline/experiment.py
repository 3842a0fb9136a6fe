"""One configured run: model x data x methods x metrics -> per-sample rows -> a versioned table."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from m2ib.errors import InputError
from m2ib.pipeline.compute import compute_attributions
from m2ib.pipeline.scoring import VALUE_COLUMNS, score
from m2ib.pipeline.tables import aggregate, run_metadata, write_table

log = logging.getLogger(__name__)
GROUP_BY = ["method", "modality"]


def build_adapter(model_cfg: dict, device: str):
    """The adapter named by a model config; returns (adapter, identity used as cache key)."""
    if model_cfg.get("pretrained") == "embedded":
        from m2ib.data.embedded import load_embedded_adapter, verify_checkpoint
        return load_embedded_adapter(device=device), {"name": model_cfg["name"], "sha256": verify_checkpoint()}
    from m2ib.models.registry import load_adapter
    adapter = load_adapter(model_cfg["name"], pretrained=model_cfg.get("pretrained"), device=device)
    identity = {"name": model_cfg["name"], "pretrained": model_cfg.get("pretrained")}
    pretrained = model_cfg.get("pretrained")
    if pretrained and Path(str(pretrained)).is_file():
        import hashlib
        identity["sha256"] = hashlib.sha256(Path(pretrained).read_bytes()).hexdigest()
    return adapter, identity


def load_samples(data_cfg: dict, progress: bool = True) -> tuple[list, int]:
    """(this job's shard of the configured data set's samples: every num_shards-th pair, total count)."""
    kind = data_cfg.get("kind")
    limit = data_cfg.get("limit")
    if kind == "embedded":
        from m2ib.data.embedded import load_embedded_split
        samples = load_embedded_split(data_cfg.get("split", "test"), limit=limit, progress=progress)
    elif kind == "mscxr":
        from m2ib.data.mscxr import load_mscxr
        samples = load_mscxr(data_cfg["csv"], data_cfg["image_root"], limit=limit,
                             max_side=data_cfg.get("max_side"), progress=progress)
    elif kind == "cc":
        from m2ib.data.cc import load_cc
        samples = load_cc(data_cfg["tsv"], data_cfg["image_root"], manifest=data_cfg.get("manifest"),
                          limit=limit, progress=progress)
    else:
        raise InputError(f"unknown data kind {kind!r}; expected embedded, mscxr or cc")
    shard, num = int(data_cfg.get("shard", 0)), int(data_cfg.get("num_shards", 1))
    if num < 1 or not 0 <= shard < num:
        raise InputError(f"data.shard must be in 0..num_shards-1, got shard={shard}, num_shards={num}")
    return samples[shard::num], len(samples)


def table_stem(cfg: dict, n: int) -> str:
    """File name of a table, saying what produced it (like timm's results-<dataset>.csv files); n is the
    data set's size before sharding, so every shard of one run shares the stem merge_shards.py joins."""
    model = cfg["model"]["name"].replace("/", "_").replace(":", "_")
    data = cfg["data"]["kind"] + (f"-{cfg['data']['split']}" if cfg["data"].get("split") else "")
    stem = f"{cfg['experiment_name']}-{model}-{data}-n{n}"
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
    if data.get("limit") is not None:
        integer("data.limit", data["limit"], 1)
    device = str(cfg.get("device", "cpu"))
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise InputError(f"device must be cpu, cuda or cuda:<index>, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device=cuda was asked for but no CUDA device is available; use device=cpu")
    if data.get("num_shards", 1) > 1 and {"roar", "sanity"} & set(cfg.get("metric") or {}):
        raise InputError("ROAR+ and the sanity checks need the whole data set in one job (the fine-tune split and "
                         "the retrieval gallery would change per shard); run them with data.num_shards=1")


def run_experiment(cfg: dict, run_dir: Optional[Path] = None) -> dict:
    """Run a resolved config (a plain dict); returns {'rows', 'table', 'paths'}."""
    check_run_settings(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = cfg.get("device", "cpu")
    progress = bool(cfg.get("progress", True))
    methods, metrics = cfg.get("method") or {}, cfg.get("metric") or {}
    if not methods or not metrics:
        raise InputError("a run needs at least one method (method=[...]) and one metric (metric=[...])")
    adapter, identity = build_adapter(cfg["model"], device)
    samples, total = load_samples(cfg["data"], progress=progress)
    if not samples:
        raise InputError(f"no samples in data set {cfg['data']}")
    seed, batch_size = int(cfg.get("seed", 0)), int(cfg.get("batch_size", 8))
    pair_metrics = {k: v for k, v in metrics.items() if k != "sanity"}
    out_dirs = [Path(run_dir)] if run_dir else []
    if cfg.get("write_results", True):
        out_dirs.append(Path(cfg["results_dir"]) / cfg["experiment_name"])
    meta = run_metadata(cfg, len(samples), device, {"seed": seed, "bootstrap_seed": seed})
    stem = table_stem(cfg, total)
    result = {"paths": {}}
    if pair_metrics:
        result = _pair_metrics(cfg, adapter, identity, samples, methods, pair_metrics, seed, batch_size, progress,
                               out_dirs, stem, meta)
    if "sanity" in metrics:
        result["sanity"] = _sanity(adapter, samples, methods, metrics["sanity"] or {}, seed, batch_size, progress,
                                   out_dirs, stem, meta)
        result["paths"].update(result["sanity"]["paths"])
    return result


def _pair_metrics(cfg, adapter, identity, samples, methods, metrics, seed, batch_size, progress, out_dirs, stem,
                  meta) -> dict:
    """Per-pair metrics of every method, merged into one row per (sample, method, modality), aggregated."""
    per_method, timings, examples = [], {}, {}
    keys = ["sample_id", "method", "modality"]
    for name, params in methods.items():
        start = time.perf_counter()
        att = compute_attributions(adapter, name, params or {}, samples, cfg["cache_dir"], identity,
                                   seed=seed, batch_size=batch_size, progress=progress)
        timings[name] = {"wall_seconds": time.perf_counter() - start,
                         "seconds_per_pair_when_computed": att.seconds / len(samples)}
        examples[name] = att.select(range(min(4, len(samples))))
        merged = None
        for metric, mparams in metrics.items():
            rows = score(metric, mparams, att, adapter, samples, progress=progress)
            if rows.empty:
                continue
            rows = rows[keys + [c for c in rows.columns if c not in keys]]
            if merged is None:
                merged = rows
            else:   # one row per (sample, method, modality) holding every metric's values
                extra = [c for c in rows.columns if c not in keys and c not in merged.columns]
                merged = merged.merge(rows[keys + extra], on=keys, how="outer", sort=False)
        if merged is not None:
            per_method.append(merged)
    if not per_method:
        raise InputError("no metric produced rows (see the warnings above)")
    rows = pd.concat(per_method, ignore_index=True)
    values = [c for m in metrics for c in VALUE_COLUMNS[m] if c in rows.columns]
    table = aggregate(rows, GROUP_BY, values, seed=seed)
    meta = {**meta, "timings": timings}
    paths = {}
    for out in out_dirs:
        paths = write_table(table, rows, out, stem, GROUP_BY, values, meta)
        if cfg.get("figures", True):
            from m2ib.figures import method_grid
            paths["examples"] = method_grid(out / f"{stem}.examples.png", adapter, samples, examples)
        log.info("wrote %s", paths["md"])
    return {"rows": rows, "table": table, "paths": paths}


def _sanity(adapter, samples, methods, params, seed, batch_size, progress, out_dirs, stem, meta) -> dict:
    """Cascading randomisation per method (maps recomputed on each randomised copy, so not cached)."""
    from metrics.attribute import attribute_with
    from metrics.sanity import cascading_randomisation, plot_sanity_curve, sanity_table
    frames = []
    for name, mparams in methods.items():
        fn = attribute_with(name, batch_size=batch_size, seed=seed, hparams=mparams or {})
        frames.append(cascading_randomisation(adapter, samples, fn, encoders=params.get("encoders", ["image", "text"]),
                                              seed=seed, absolute=bool(params.get("absolute", False)),
                                              method=name, progress=progress))
    rows = pd.concat(frames, ignore_index=True)
    paths = {}
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)
        paths["sanity_rows"] = out / f"{stem}.sanity.rows.csv"
        rows.to_csv(paths["sanity_rows"], index=False, float_format="%.6g")
        for value in ("spearman", "ssim"):
            table = sanity_table(rows, value)
            paths[f"sanity_{value}"] = out / f"{stem}.sanity-{value}.csv"
            table.to_csv(paths[f"sanity_{value}"], float_format="%.4g")
            (out / f"{stem}.sanity-{value}.md").write_text(table.round(3).to_string() + "\n")
            paths[f"sanity_{value}_curve"] = plot_sanity_curve(rows, out / f"{stem}.sanity-{value}.png", value)
        (out / f"{stem}.sanity.meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return {"rows": rows, "paths": paths}
