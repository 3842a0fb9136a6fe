"""Compare a freshly computed table with the committed reference and say which cells moved."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from m2ib.core.errors import InputError


def compare_tables(current: pd.DataFrame, reference: pd.DataFrame, by: Sequence[str], values: Sequence[str],
                   atol: float, rtol: float) -> pd.DataFrame:
    """Cells where |current - reference| > atol + rtol * |reference| (NaN must stay NaN).

    Returns one row per drifted cell: the group keys, column, reference, current, difference.
    Groups or columns present in only one table are reported as drift too.
    """
    by = list(by)
    cur = current.set_index(by)
    ref = reference.set_index(by)
    drift = []
    for key in ref.index.union(cur.index):
        for col in values:
            r = ref.at[key, col] if key in ref.index and col in ref.columns else None
            c = cur.at[key, col] if key in cur.index and col in cur.columns else None
            key_t = key if isinstance(key, tuple) else (key,)
            if r is None or c is None:
                drift.append((*key_t, col, r, c, float("nan")))
                continue
            r, c = float(r), float(c)
            if np.isnan(r) and np.isnan(c):
                continue
            if np.isnan(r) != np.isnan(c) or abs(c - r) > atol + rtol * abs(r):
                drift.append((*key_t, col, r, c, c - r))
    return pd.DataFrame(drift, columns=[*by, "column", "reference", "current", "difference"])


def format_drift(drift: pd.DataFrame, atol: float, rtol: float) -> str:
    """A readable report of drifted cells."""
    if drift.empty:
        return "no metric moved beyond the tolerances"
    lines = [f"{len(drift)} table cell(s) moved beyond atol={atol:g} + rtol={rtol:g} * |reference|:"]
    for _, r in drift.iterrows():
        keys = " / ".join(str(r[c]) for c in drift.columns[:-4])
        lines.append(f"  {keys:30s} {r['column']:16s} reference {r['reference']!s:>12} -> current "
                     f"{r['current']!s:>12}  (diff {r['difference']:+.3g})")
    return "\n".join(lines)


def check_against_reference(current: pd.DataFrame, reference_csv, by, values, atol: float, rtol: float) -> str:
    """Raise AssertionError with the drift report if any cell moved; return the OK report otherwise."""
    try:
        reference = pd.read_csv(reference_csv)
    except FileNotFoundError as exc:
        raise InputError(f"reference table {reference_csv} is missing; create it with `make regression-reference`") from exc
    drift = compare_tables(current, reference, by, values, atol, rtol)
    report = format_drift(drift, atol, rtol)
    if not drift.empty:
        raise AssertionError(f"metric regression against {reference_csv}\n{report}\n"
                             f"If the change is intended, regenerate the reference with `make regression-reference` "
                             f"and commit it with the reason.")
    return report
