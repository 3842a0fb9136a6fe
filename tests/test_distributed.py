"""The SLURM path apart from the scheduler: a two-job Hydra multirun through hydra-submitit's LOCAL
executor (the same launcher plugin as hydra/launcher=cluster, which submits the same jobs to SLURM),
one shard per job, merged by scripts/merge_shards.py into the table an unsharded run gives."""
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "scripts" / "run.py")]
COMMON = ["model=tiny", "data.limit=4", "method=[random]", "metric=[localisation]", "progress=false", "figures=false"]


def test_submitit_local_multirun_shards_merge_into_the_unsharded_table(tmp_path):
    common = COMMON + [f"cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(RUN + ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                                 f"hydra.sweep.dir={tmp_path / 'multirun'}", "data.num_shards=2", "data.shard=0,1",
                                 f"results_dir={tmp_path / 'tables'}", *common],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted((tmp_path / "tables" / "custom").glob("*-shard*of2.rows.csv"))
    assert [s.name[-len("shard0of2.rows.csv"):] for s in shards] == ["shard0of2.rows.csv", "shard1of2.rows.csv"]
    assert (tmp_path / "multirun" / ".submitit").is_dir()          # really went through submitit
    stem = str(shards[0])[: -len("-shard0of2.rows.csv")]
    merged = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_shards.py"), stem],
                            capture_output=True, text=True, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    whole = subprocess.run(RUN + [*common, f"results_dir={tmp_path / 'whole'}", f"hydra.run.dir={tmp_path / 'run'}"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = pd.read_csv(tmp_path / "whole" / "custom" / f"{Path(stem).name}.csv")   # same name: same identity
    got = pd.read_csv(f"{stem}.csv")
    cols = ["method", "modality", "n", "iou", "iou_ci_low", "iou_ci_high", "text_ap"]
    pd.testing.assert_frame_equal(got[cols].sort_values("modality").reset_index(drop=True),
                                  expected[cols].sort_values("modality").reset_index(drop=True))
