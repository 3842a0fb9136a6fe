"""The installed package: a NON-editable install of the project (pip install --target, no dependencies:
they come from this environment) run as the `m2ib-bench` command from another directory, so every
path it needs (configs, model configs, the bundled checkpoint, caches, outputs) is proved to come from
the installed copy or the current directory, never from this checkout.

Cost: about 20 s of CPU (measured: user 22.7 s for the whole file): the build (~5 s) and four fresh Python
processes that import torch; 70 s of wall time on the shared 2-core machine at load average 8."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
from setuptools.config.pyprojecttoml import read_configuration

import m2ib
from m2ib.core.errors import InputError
from m2ib.data.embedded import split_dir
from m2ib.pipeline import provenance

ROOT = Path(__file__).resolve().parents[1]
#: What a wheel is built from; the rest of the checkout (tests, results, caches, git) stays behind.
SOURCES = ("pyproject.toml", "README.md", "conf", "m2ib", "baselines", "metrics")
PYPROJECT = read_configuration(ROOT / "pyproject.toml")   # tomllib is Python 3.11+, the project 3.10+


def install(tmp):
    """(site folder holding a non-editable install of this checkout, environment that imports it first,
    an empty work folder elsewhere)."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    site = tmp / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # The installed copy's default data cache is the user cache: give it the already generated split.
    xdg = tmp / "xdg"
    shutil.copytree(split_dir("test"), split_dir("test", xdg / "m2ib-bench" / "embedded"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2IB_")}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(xdg), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    work = tmp / "elsewhere"
    work.mkdir()
    return site, env, work


def test_the_installed_command_works_from_another_directory(tmp_path):
    """One test, not three sharing a fixture: pytest-xdist would build the install once per worker."""
    site, env, work = install(tmp_path)

    def run(*cmd):
        return subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True)

    # the installed copy is the one imported, with the project's version and every config file
    code = "import m2ib, m2ib.core.paths as p; print(m2ib.__file__); print(m2ib.__version__); print(p.config_dir())"
    done = run(sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    file, version, conf = done.stdout.split()
    assert Path(file).is_relative_to(site) and Path(conf) == site / "m2ib" / "conf"
    assert version == PYPROJECT["project"]["version"]
    shipped = sorted(p.relative_to(conf).as_posix() for p in Path(conf).rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))

    # --help lists what can be run, then Hydra's own help; --hydra-help still works
    bench = str(site / "bin" / "m2ib-bench")
    done = run(bench, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    for section, name in [("Methods", "m2ib"), ("Methods", "rise"), ("Models", "embedded"),
                          ("Data sets", "embedded"), ("Metrics", "localisation")]:
        block = done.stdout.split(f"== {section}")[1].split("\n\n")[0]
        assert any(line.split()[0] == name for line in block.splitlines()[1:]), (section, name, block)
    assert "== Configuration groups ==" in done.stdout
    assert "Hydra" in run(bench, "--hydra-help").stdout

    # a run writes its table under the current directory, with no commit recorded and nothing beside the code
    done = run(bench, "experiment=table1", "data.limit=4", "method=[m2ib,random]", "method.m2ib.steps=2",
               "method.m2ib.copies=2", "metric.confidence.modalities=[image]", "progress=false", "figures=false",
               "cache_dir=cache")
    assert done.returncode == 0, done.stderr[-3000:]
    tables = list((work / "runs" / "tables").rglob("*.md"))
    assert len(tables) == 1 and "m2ib" in tables[0].read_text() and "random" in tables[0].read_text()
    meta = tables[0].with_suffix(".meta.json").read_text()
    assert '"git_commit": null' in meta and "not a git checkout" in meta
    assert (work / "cache").is_dir() and not list(site.rglob(".cache"))


def test_an_installed_copy_keeps_caches_out_of_site_packages_and_refuses_to_publish(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "source_checkout", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("M2IB_EMBEDDED_CACHE", raising=False)
    from m2ib.data import embedded
    monkeypatch.setattr(embedded, "source_checkout", lambda: None)
    assert embedded.cache_dir() == tmp_path / "m2ib-bench" / "embedded"
    state = provenance.git_state()
    assert state == {"commit": None, "dirty_files": []}
    with pytest.raises(InputError, match=r"needs a git checkout .* installed copy.*drop publish=true"):
        provenance.check_publishable({"publish": True}, state)


def test_the_wheel_lists_every_package_of_the_tree():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set(setuptools.find_packages(str(ROOT), include=["m2ib*", "baselines*", "metrics*"]))
    assert listed == found | {"m2ib.conf"}, "update [tool.setuptools] packages in pyproject.toml"


def test_top_level_api_is_lazy_and_complete():
    assert set(m2ib.__all__) == {"explain", "load_adapter", "__version__"}
    from m2ib.api import explain
    from m2ib.models.sources import load_adapter
    assert m2ib.explain is explain and m2ib.load_adapter is load_adapter
    with pytest.raises(AttributeError):
        m2ib.no_such_thing
