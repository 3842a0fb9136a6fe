"""Where the code runs from, and where it may write: a source checkout keeps its caches inside the
repository (as before); an installed copy (a wheel in site-packages) writes only under the current
directory or the user's cache folder, never beside its own files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def source_checkout() -> Optional[Path]:
    """The repository root when m2ib is imported from a source checkout (pyproject.toml and conf/
    beside the package: a clone, an editable install, PYTHONPATH), else None (an installed copy)."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file() else None


def config_dir() -> Path:
    """The Hydra configs: the checkout's conf/, or the copy a wheel ships as the package data m2ib/conf
    (pyproject.toml maps conf/ to m2ib.conf, so the YAML files exist once in the repository)."""
    root = source_checkout()
    return root / "conf" if root is not None else PACKAGE_DIR / "conf"


def user_cache_dir(*parts: str) -> Path:
    """$XDG_CACHE_HOME/m2ib-bench/... (default ~/.cache/m2ib-bench/...): caches of an installed copy."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "m2ib-bench", *parts)


def missing_asset_message(path: Path, what: str, rebuild: str) -> str:
    """One line for a bundled file (m2ib/assets/...) that is not there: which file, how to get it back."""
    where = source_checkout()
    restore = (f"`git -C {where} checkout -- {Path(path).relative_to(where).as_posix()}`" if where is not None
               and Path(path).is_relative_to(where) else "`pip install --force-reinstall --no-deps m2ib-bench`")
    return (f"{what} {path} is missing: it ships with m2ib-bench (committed under m2ib/assets/, inside the wheel); "
            f"restore it with {restore}, or {rebuild}")
