"""Results that cannot be lost or silently wrong: tables named by what produced them, never overwritten by
another configuration, published only from a clean tree, with a data fingerprint; tampered embedded data
are detected and named; Ctrl-C ends with one line saying what is kept."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from m2ib.core.errors import InputError
from m2ib.data.embedded import ensure_split, load_embedded_split, split_dir
from m2ib.pipeline import experiment
from m2ib.pipeline.experiment import output_dirs, run_experiment, table_stem
from m2ib.pipeline.provenance import check_overwrite, check_publishable, data_fingerprint, git_state

CONF = Path(__file__).resolve().parents[1] / "conf"


def config(overrides=(), **updates):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)
    cfg.update(updates)
    return cfg


def test_table_names_carry_the_configuration():
    base = table_stem(config(["experiment=table1"]), 500)
    assert base.startswith("table1-m2ib-shapes-vit-embedded-test-n500-")
    assert table_stem(config(["experiment=table1"]), 500) == base                       # deterministic
    assert table_stem(config(["experiment=table1", "method.m2ib.image_beta=1.0"]), 500) != base
    assert table_stem(config(["experiment=table1", "metric.confidence.quantile=0.3"]), 500) != base
    assert table_stem(config(["experiment=table1", "seed=1"]), 500) != base
    # where and how fast a table is computed does not change its numbers, nor its name
    assert table_stem(config(["experiment=table1", "threads=2", "batch_size=3", "device=cpu"]), 500) == base
    sharded = table_stem(config(["experiment=table1", "data.shard=1", "data.num_shards=2"]), 500)
    assert sharded == base + "-shard1of2"


def test_ad_hoc_runs_write_under_runs_and_publishing_under_results(tmp_path):
    assert output_dirs(config(["experiment=table1"]), None) == [Path("runs/tables/table1")]
    assert output_dirs(config(["experiment=table1", "publish=true"]), tmp_path) == [tmp_path, Path("results/table1")]
    assert output_dirs(config(["experiment=sweep"]), tmp_path) == [tmp_path]            # write_results: false


def test_two_configurations_never_share_a_file(tmp_path):
    """A multirun over a hyperparameter: each job keeps its own table."""
    paths = []
    for quantile in (0.3, 0.6):
        cfg = config(["model=tiny", "data.limit=2", "method=[random]", "metric=[confidence]",
                      f"metric.confidence.quantile={quantile}"],
                     cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "tables"), progress=False,
                     figures=False)
        paths.append(run_experiment(cfg)["paths"]["csv"])
    assert paths[0] != paths[1] and all(Path(p).is_file() for p in paths)
    meta = json.loads(Path(paths[0]).with_suffix(".meta.json").read_text())
    assert meta["result_identity"] in Path(paths[0]).name
    assert len(meta["data_fingerprint"]) == 64 and meta["code_version"] and meta["threads"] >= 1
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40


def test_a_table_of_another_configuration_is_never_overwritten(tmp_path):
    meta = tmp_path / "t.meta.json"
    check_overwrite(meta, "abc")                                      # nothing there yet
    meta.write_text(json.dumps({"result_identity": "abc"}))
    check_overwrite(meta, "abc")                                      # the same configuration may rewrite it
    with pytest.raises(InputError, match="another configuration"):
        check_overwrite(meta, "def")


def test_publishing_needs_a_clean_tree():
    dirty = {"commit": "f" * 40, "dirty_files": ["m2ib/api.py"]}
    clean = {"commit": "f" * 40, "dirty_files": []}
    check_publishable({"publish": False}, dirty)
    check_publishable({"publish": True}, clean)
    check_publishable({"publish": True, "allow_dirty": True}, dirty)
    with pytest.raises(InputError, match="uncommitted changes .*m2ib/api.py.*allow_dirty=true"):
        check_publishable({"publish": True}, dirty)
    with pytest.raises(InputError, match="git checkout"):
        check_publishable({"publish": True}, {"commit": None, "dirty_files": []})


def test_git_state_ignores_the_tables_being_written(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "0")
    git("add", ".")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "1")
    assert git_state(tmp_path)["dirty_files"] == []
    (tmp_path / "results" / "t.csv").write_text("b\n")
    assert git_state(tmp_path)["dirty_files"] == []
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty_files"] == ["code.py"]


def test_a_tampered_embedded_image_is_detected_and_named(tmp_path):
    source = split_dir("test")
    copy = split_dir("test", tmp_path)
    shutil.copytree(source, copy)                                     # copy2 keeps sizes and times
    assert ensure_split("test", root=tmp_path, progress=False) == copy
    image = sorted((copy / "images").glob("*.png"))[3]
    Image.open(image).save(image)                                     # rewritten, same pixels: fine
    assert ensure_split("test", root=tmp_path, progress=False) == copy
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    with pytest.raises(InputError, match=f"images/{image.name}"):
        ensure_split("test", root=tmp_path, progress=False)


def test_the_data_fingerprint_sees_one_changed_pixel():
    samples = load_embedded_split("test", limit=3, progress=False)
    before = data_fingerprint(samples)
    pixels = np.asarray(samples[1].image).copy()
    pixels[5, 5] = 255 - pixels[5, 5]
    samples[1].image = Image.fromarray(pixels)
    assert data_fingerprint(samples) != before


def test_ctrl_c_ends_with_one_line_saying_what_is_kept(tmp_path, monkeypatch):
    from m2ib.core import attributor as core

    calls = []
    real = core.Attributor.attribute

    def interrupted_on_second_batch(self, pixels, text, seeds):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, pixels, text, seeds)

    monkeypatch.setattr(core.Attributor, "attribute", interrupted_on_second_batch)
    cfg = config(["model=tiny", "data.limit=4", "method=[random]", "metric=[confidence]"], batch_size=2,
                 cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "tables"), progress=False)
    with pytest.raises(experiment.Interrupted, match=r"2 pairs of random computed and cached .* re-run"):
        run_experiment(cfg)


def test_ad_hoc_runs_leave_git_status_clean(tmp_path):
    """An ad hoc run with the default output folders, from the repository root, adds nothing git sees."""
    import sys
    root = CONF.parent

    def status():
        return subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    before = status()
    done = subprocess.run([sys.executable, "scripts/run.py", "model=tiny", "data.limit=2", "method=[random]",
                           "metric=[localisation]", "progress=false", f"cache_dir={tmp_path / 'cache'}"],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "runs/tables/custom/custom-m2ib-tiny-vit-embedded-test-n2-" in done.stdout
    assert status() == before
