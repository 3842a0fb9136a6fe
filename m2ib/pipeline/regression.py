"""Compare a freshly computed table with the committed reference and say which cells moved.

A table (m2ib.pipeline.tables.aggregate) has one row per group (method, modality) and, per metric value
column <v>: the mean <v>, its bootstrap interval <v>_ci_low / <v>_ci_high and the number of pairs it was
computed on <v>_n, plus the group size n. The comparison covers all of them:

- means and interval bounds: within atol + rtol * |reference|, and NaN must stay NaN;
- counts (n, <v>_n) and any other column: exactly;
- a group or a column present in only one of the two tables is drift too.

Rows and columns are matched by name, so their order does not matter.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from m2ib.core.errors import InputError

BOUNDS = ("_ci_low", "_ci_high")
DRIFT_COLUMNS = ["column", "problem", "reference", "current", "difference"]
#: Problems of one cell (the others concern a whole group or column, marked '*').
CELL_PROBLEMS = ("moved", "became NaN", "no longer NaN", "changed")


def approximate_columns(values: Sequence[str]) -> list[str]:
    """The columns compared within the tolerances: each value's mean and interval bounds."""
    return [c for v in values for c in (v, *(v + b for b in BOUNDS))]


def cell_problem(reference, current, approximate: bool, atol: float, rtol: float):
    """Why a cell drifted ('moved', 'became NaN', 'no longer NaN', 'changed'), or None if it did not."""
    if approximate:
        r, c = float(reference), float(current)
        if np.isnan(r) or np.isnan(c):
            return None if np.isnan(r) and np.isnan(c) else ("became NaN" if np.isnan(c) else "no longer NaN")
        if np.isinf(r) or np.isinf(c):
            return None if r == c else "moved"
        return "moved" if abs(c - r) > atol + rtol * abs(r) else None
    if pd.isna(reference) and pd.isna(current):
        return None
    return None if reference == current else "changed"


def compare_tables(current: pd.DataFrame, reference: pd.DataFrame, by: Sequence[str], values: Sequence[str],
                   atol: float, rtol: float) -> pd.DataFrame:
    """Every drifted cell, group or column of `current` against `reference` (see the module docstring).

    Returns one row per drift: the group keys ('*' for a whole column), the column ('*' for a whole
    group), the problem, the reference and current values and their difference (NaN where not numeric).
    """
    by = list(by)
    cur, ref = current.set_index(by), reference.set_index(by)
    approximate = set(approximate_columns(values))
    drift = []

    def report(key, column, problem, r=None, c=None):
        key = key if isinstance(key, tuple) else (key,)
        numeric = all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in (r, c))
        drift.append((*key, column, problem, r, c, float(c) - float(r) if numeric else float("nan")))

    everywhere = ("*",) * len(by)
    for col in dict.fromkeys([*values, *ref.columns, *cur.columns]):
        in_ref, in_cur = col in ref.columns, col in cur.columns
        if not (in_ref and in_cur):
            report(everywhere, col, "extra column" if in_cur else "missing column" if in_ref else "missing in both")
    columns = [c for c in ref.columns if c in cur.columns]

    duplicated = set()
    for name, table in (("reference", ref), ("current", cur)):
        for key in table.index[table.index.duplicated()].unique():
            duplicated.add(key)
            report(key, "*", f"duplicate group in {name}")
    for key in ref.index.unique().difference(cur.index, sort=False):
        report(key, "*", "missing group")
    for key in cur.index.unique().difference(ref.index, sort=False):
        report(key, "*", "extra group")

    for key in ref.index.unique().intersection(cur.index, sort=False):
        if key in duplicated:
            continue
        for col in columns:
            r, c = ref.at[key, col], cur.at[key, col]
            problem = cell_problem(r, c, col in approximate, atol, rtol)
            if problem:
                report(key, col, problem, r, c)
    return pd.DataFrame(drift, columns=[*by, *DRIFT_COLUMNS])


def format_drift(drift: pd.DataFrame, atol: float, rtol: float) -> str:
    """A readable report of drifted cells, groups and columns."""
    if drift.empty:
        return "no metric moved beyond the tolerances"
    keys = list(drift.columns[:drift.columns.get_loc("column")])
    lines = [f"{len(drift)} difference(s) from the reference (means and interval bounds within atol={atol:g} "
             f"+ rtol={rtol:g} * |reference|, counts exactly):"]
    for _, r in drift.iterrows():
        where = " / ".join(str(r[k]) for k in keys)
        line = f"  {where:30s} {r['column']:20s} {r['problem']}"
        if r["problem"] in CELL_PROBLEMS:
            line += f": reference {_show(r['reference']):>12} -> current {_show(r['current']):>12}"
            if np.isfinite(r["difference"]):
                line += f"  (diff {r['difference']:+.3g})"
        lines.append(line)
    return "\n".join(lines)


def _show(value) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float, np.number)) else str(value)


def check_against_reference(current: pd.DataFrame, reference_csv, by, values, atol: float, rtol: float) -> str:
    """Raise AssertionError with the drift report if anything moved; return the OK report otherwise."""
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
