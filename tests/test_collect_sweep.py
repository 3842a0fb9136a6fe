"""scripts/collect_sweep.py: a multirun's jobs joined into one table named by the sweep's identity, so a sweep
of other settings never overwrites another; the estimator mode is recorded."""
import importlib.util
import json
from pathlib import Path

import pandas as pd
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "collect_sweep.py"


def _module():
    spec = importlib.util.spec_from_file_location("collect_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_sweep(root: Path, mode: str, tag: str) -> Path:
    """Four finished jobs of a beta x var grid, each as Hydra and the pipeline leave them."""
    for job, (beta, var) in enumerate([(0.1, 1), (0.1, 4), (1, 1), (1, 4)]):
        folder = root / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"sweep.beta={beta}",
                                                                          f"method.m2ib.var={var}"]))
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"method": {"m2ib": {"mode": mode, "var": var}}}))
        pd.DataFrame({"method": ["m2ib"], "modality": ["image"], "n": [4], "iou": [beta * var]}).to_csv(
            folder / "sweep-x.csv", index=False)
        (folder / "sweep-x.meta.json").write_text(json.dumps({"result_identity": f"{tag}{job}"}))
    return root


def test_sweeps_of_other_settings_get_their_own_files(tmp_path, monkeypatch):
    collect_sweep = _module()
    monkeypatch.setattr(collect_sweep, "git_state", lambda: {"commit": "abc", "dirty_files": []})
    out = tmp_path / "out"
    collect_sweep.main([str(_fake_sweep(tmp_path / "a", "iba", "a")), "--out", str(out)])
    first = sorted(p.name for p in out.iterdir())
    stem = f"sweep-{collect_sweep.sweep_identity(['a0', 'a1', 'a2', 'a3'])}"
    assert f"{stem}.csv" in first and f"{stem}.meta.json" in first and f"{stem}-iou-image.png" in first
    meta = json.loads((out / f"{stem}.meta.json").read_text())
    assert meta["method"]["m2ib"]["mode"] == "iba" and meta["swept"] == ["sweep.beta", "method.m2ib.var"]
    table = pd.read_csv(out / f"{stem}.csv")
    assert sorted(table["iou"]) == [0.1, 0.4, 1.0, 4.0]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    collect_sweep.main([str(_fake_sweep(tmp_path / "b", "normalized", "b")), "--out", str(out)])
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(after) == 2 * len(before)
    assert all(after[name] == data for name, data in before.items())        # the first sweep untouched
