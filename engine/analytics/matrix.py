"""Importances of one (method, sign, stat) as a patients × (target, RoI) matrix.

The analytics hold this matrix, never the long table: a store reader builds it with a DuckDB
PIVOT (``Store.importance_wide``), and :func:`from_long` builds the same matrix from a long Polars
frame (reference imports, tests, notebooks).

A missing value means different things for the two stats. A RoI with no voxels has mass 0 (and
the aggregation writes that 0), so a missing *mass* of a patient who has the target is 0. A
missing *mean* is undefined and stays NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from engine.errors import UserError

#: Separator of target and RoI in the wide frame's column names (never part of a class name).
SEP = "\x1f"


class SelectionError(UserError, ValueError):
    """Importances that cannot be selected as asked (no rows, several methods, unknown method)."""


def choose_method(available: Sequence[str], method: str | None, *, error: type[Exception] = SelectionError,
                  what: str = "use") -> str:
    """The attribution method to read: ``method`` if the run holds it, else the run's only one."""
    if not available:
        raise error(f"no importances of done patients to {what}; the run holds no importance rows for done "
                    "patients yet")
    if method is None:
        if len(available) != 1:
            raise error(f"the importances hold several methods {list(available)}; choose one with method=/--method")
        return available[0]
    if method not in available:
        raise error(f"method {method!r} not in the importances; available: {list(available)}")
    return method


def select_importances(
    importances: pl.DataFrame, *, method: str | None, sign: str = "abs", stat: str = "mass"
) -> tuple[pl.DataFrame, str]:
    """Rows of one (method, sign, stat) and the method; the method is inferred when only one is present."""
    if importances.height == 0:
        raise SelectionError("no importances to analyse; the run holds no importance rows yet")
    methods = sorted(importances["method"].unique().to_list())
    if method is None:
        if len(methods) != 1:
            raise SelectionError(f"the importances hold several methods {methods}; choose one with method=/--method")
        method = methods[0]
    elif method not in methods:
        raise SelectionError(f"method {method!r} not in the importances; available: {methods}")
    df = importances.filter((pl.col("method") == method) & (pl.col("sign") == sign) & (pl.col("stat") == stat))
    if df.height == 0:
        raise SelectionError(f"no importances with method={method!r}, sign={sign!r}, stat={stat!r}")
    return df, method


@dataclass(frozen=True)
class ImportanceMatrix:
    """``values[p, t, r]``: importance of target ``targets[t]`` in RoI ``rois[r]`` for ``patient_ids[p]``.

    NaN where there is no value. ``has_target[p, t]``: the patient has at least one row for the target.
    """

    patient_ids: list[str]
    targets: list[str]
    rois: list[str]
    values: np.ndarray
    method: str
    sign: str = "abs"
    stat: str = "mass"

    @property
    def has_target(self) -> np.ndarray:
        return ~np.isnan(self.values).all(axis=2)

    def filled(self) -> np.ndarray:
        """Values with a missing mass read as 0 for patients that have the target (means stay NaN)."""
        if self.stat != "mass":
            return self.values
        return np.where(np.isnan(self.values) & self.has_target[:, :, None], 0.0, self.values)

    def block(self, target: str, rois: Sequence[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
        """(patients that have ``target``, RoIs, their patients × RoIs matrix), missing masses read as 0."""
        t = self.targets.index(target)
        rois = list(self.rois if rois is None else rois)
        x = np.zeros((len(self.patient_ids), len(rois)))
        index = {r: i for i, r in enumerate(self.rois)}
        filled = self.values[:, t, :]  # one target's slice; the whole matrix is never copied
        if self.stat == "mass":
            filled = np.nan_to_num(filled, nan=0.0)
        for j, r in enumerate(rois):
            if r in index:
                x[:, j] = filled[:, index[r]]
            elif self.stat != "mass":
                x[:, j] = np.nan
        rows = ~np.isnan(self.values[:, t, :]).all(axis=1)
        return [p for p, ok in zip(self.patient_ids, rows) if ok], rois, x[rows]

    def subset(self, patient_ids: Sequence[str]) -> ImportanceMatrix:
        """The rows of the given patients (in the given order; unknown ids are skipped)."""
        index = {p: i for i, p in enumerate(self.patient_ids)}
        keep = [index[p] for p in patient_ids if p in index]
        return ImportanceMatrix([self.patient_ids[i] for i in keep], self.targets, self.rois,
                                self.values[keep], self.method, self.sign, self.stat)


def from_wide(wide: pl.DataFrame, *, method: str, sign: str = "abs", stat: str = "mass") -> ImportanceMatrix:
    """The matrix from a frame ``patient_id, "target\\x1froi", ...`` (the store's PIVOT)."""
    cols = [c for c in wide.columns if c != "patient_id"]
    pairs = [tuple(c.split(SEP, 1)) for c in cols]
    targets = sorted({t for t, _ in pairs})
    rois = sorted({r for _, r in pairs})
    ti = {t: i for i, t in enumerate(targets)}
    ri = {r: i for i, r in enumerate(rois)}
    values = np.full((wide.height, len(targets), len(rois)), np.nan)
    for col, (t, r) in zip(cols, pairs):
        values[:, ti[t], ri[r]] = wide[col].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    return ImportanceMatrix(wide["patient_id"].cast(pl.String).to_list(), targets, rois, values, method, sign, stat)


def from_long(
    importances: pl.DataFrame, *, method: str | None = None, sign: str = "abs", stat: str = "mass"
) -> ImportanceMatrix:
    """The matrix of one (method, sign, stat) from the long format (duplicates averaged)."""
    df, method = select_importances(importances, method=method, sign=sign, stat=stat)
    wide = (
        df.select(pl.col("patient_id").cast(pl.String), (pl.col("target") + SEP + pl.col("roi")).alias("f"),
                  pl.col("value").cast(pl.Float64))
        .pivot(on="f", index="patient_id", values="value", aggregate_function="mean")
        .sort("patient_id")
    )
    return from_wide(wide, method=method, sign=sign, stat=stat)
