"""The HTML report beside a table, built by the real pipeline and opened in headless chromium: the table,
the thumbnails, the filter and pager (its script ran), the enlarged view, no network; and missing maps
named in one line. Chromium is a test prerequisite (`make test` installs it through `make browser`)."""
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from m2ib.core.errors import InputError
from m2ib.core.geometry import InputFrame
from m2ib.data.registry import load_dataset
from m2ib.pipeline.experiment import run_experiment
from m2ib.pipeline.report import input_cells, report_settings, write_report

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = ["random", "saliency", "raw_attention"]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is missing: the report's browser test needs it; `make test` installs it "
                    "(`make browser`: apt-get install chromium)")
    return path


def browse(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless chromium once on url (its own profile folder: tests may run in parallel)."""
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                           "--window-size=1200,1400", *args, url], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The real pipeline on the tiny model: 5 embedded pairs x 3 methods, localisation + deletion (curves),
    2 pairs per page."""
    out = tmp_path_factory.mktemp("report")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "data.limit=5", f"method=[{','.join(METHODS)}]",
                                           "metric=[localisation,deletion]", "metric.deletion.steps=4",
                                           "report.pairs_per_page=2"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(cache_dir=str(out / "cache"), results_dir=str(out / "results"), progress=False, figures=False)
    return run_experiment(cfg)


def test_the_report_renders_in_chromium_with_table_thumbnails_filter_and_viewer(run, tmp_path):
    page = Path(run["paths"]["report"])
    text = page.read_text()
    assert page.name.endswith(".report.html") and page.parent == Path(run["paths"]["csv"]).parent
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<link" not in text     # nothing fetched
    rows = pd.read_csv(run["paths"]["rows"])
    image = rows[(rows.method == "saliency") & (rows.modality == "image")]
    ious = sorted(image.iou)
    cut = (ious[1] + ious[2]) / 2                  # between two pairs' values: no ties at the cut
    picked = sorted(image.loc[image.iou < cut, "sample_id"])
    assert 0 < len(picked) < 5                     # the filter below keeps some pairs and drops others

    # The filter from the address (saliency's IoU below its median); the enlarged view of one cell.
    opened = picked[0]
    url = f"{page.as_uri()}#method=saliency&metric=image:iou&op=%3C&value={cut!r}&open={opened}/raw_attention"
    done = browse(url, tmp_path, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-ready="1"' in dom, "the report's script did not run"
    table = re.search(r'<table class="sortable" id="results">(.*?)</table>', dom, re.S).group(1)
    assert table.count("<tr>") == 1 + 2 * len(METHODS)                 # header + method x modality
    assert re.search(r"\d\.\d{3} <small>\[-?\d\.\d{3}, -?\d\.\d{3}\]", table)   # mean [interval]
    for control in ("f-method", "f-metric", "f-op", "f-value", "f-apply", "prev", "next"):
        assert f'id="{control}"' in dom
    assert len(re.findall(r'<img loading="lazy" class="thumb" src="data:image/jpeg;base64,', dom)) == 5 * len(METHODS)
    status = re.search(r'<span id="status">([^<]*)</span>', dom).group(1)
    assert status.startswith(f"pairs 1-{min(len(picked), 2)} of {len(picked)} shown (5 in the run)"), status
    assert re.findall(r'<tr class="pair on" data-id="([^"]+)"', dom) == picked[:2]
    hits = re.findall(r'<tr class="pair on".*?</tr>', dom, re.S)
    assert all('<td class="cell hit" data-method="saliency">' in tr for tr in hits)   # the matching cell marked
    assert '<div id="viewer" class="open">' in dom and f"raw_attention on {opened}" in dom
    assert dom.count('<figure><img src="data:image/png;base64,') == 1                # the deletion curves

    # Paging without a filter: page 3 of 3 holds the fifth pair only.
    dom = browse(f"{page.as_uri()}#page=3", tmp_path, "--dump-dom").stdout
    assert re.findall(r'<tr class="pair on" data-id="([^"]+)"', dom) == ["test-00004"]

    shot = tmp_path / "report.png"
    done = browse(page.as_uri(), tmp_path, f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 20_000, done.stderr[-2000:]


def test_missing_maps_are_named_in_one_line_and_drawn_as_missing(run, tmp_path):
    samples = load_dataset({"kind": "embedded", "split": "test", "limit": 3}, progress=False)
    settings = report_settings({})
    inputs = input_cells(samples, InputFrame((32, 32)), settings)
    cells = {"saliency": [inputs[0], None, None], "random": inputs}
    page = write_report(tmp_path / "r.html", title="t", samples=samples, inputs=inputs, cells=cells, meta={},
                        settings=settings)
    text = page.read_text()
    line = re.search(r'<p class="missing" id="missing">([^<]*)</p>', text).group(1)
    assert line == "Missing maps (no cached row), shown as empty cells: saliency: 2 pairs (test-00001, test-00002)"
    assert text.count('<td class="cell miss" data-method="saliency">') == 2
    with pytest.raises(InputError, match="has 1 cells for 3 pairs"):
        write_report(tmp_path / "r.html", title="t", samples=samples, inputs=inputs, cells={"x": [None]}, meta={},
                     settings=settings)


@pytest.mark.parametrize("block, match", [({"pairs_per_page": 0}, "pairs_per_page must be >= 1"),
                                         ({"pages": 3}, r"unknown parameter\(s\) \['pages'\]"),
                                         ({"enabled": "yes"}, "enabled must be true or false")])
def test_bad_report_settings_are_one_line(block, match):
    with pytest.raises(InputError, match=match):
        report_settings(block)
