"""Parse the reference implementation's wide CSV into the engine's long frames.

The reference code (MI2DataLab/agg2exp) writes one row per patient (column ``patient``) with

* ``{target}_explanation_in_{roi}_mass`` / ``_mean``: the aggregated attribution of ``target``
  inside ``roi`` (the importances; the reference aggregates absolute attributions, so the sign
  is ``abs``);
* ``{target}_explanation_var`` / ``_mean``: whole-volume statistics of the explanation map;
* ``{class}_dice`` / ``{class}_iou``: segmentation quality per class.

With ``seperate_neg_and_pos`` the reference merges a run on the negative part and one on the
positive part, suffixing every column ``_neg`` / ``_pos``: the importances become signs ``neg``
and ``pos`` (each part as a magnitude, as here). Columns that match none of these patterns are
named in a warning, never dropped silently.

Class names are translated through :data:`engine.labels.REFERENCE_ALIASES` (``vertebraes`` ->
``vertebrae``) so that imported runs and engine runs use the same names.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from engine.errors import UserError
from engine.labels import REFERENCE_ALIASES

logger = logging.getLogger(__name__)

#: Environment variable that points at the shared data folder (tests, notebooks).
SHARED_DATA_ENV = "AGG2EXP_SHARED_DATA"

_IMPORTANCE = re.compile(r"^(?P<target>.+)_explanation_in_(?P<roi>.+)_(?P<stat>mass|mean)(?:_(?P<sign>pos|neg))?$")
_SUMMARY = re.compile(r"^(?P<target>.+)_explanation_(?P<stat>var|mean)$")
_QUALITY = re.compile(r"^(?P<cls>.+)_(?P<metric>dice|iou)$")


class ReferenceFormatError(UserError, ValueError):
    """A CSV that does not have the reference implementation's wide layout."""


@dataclass(frozen=True)
class ReferenceData:
    """The long frames parsed from one reference CSV."""

    importances: pl.DataFrame  # patient_id, method, target, roi, stat, sign, value
    predictions: pl.DataFrame  # patient_id, class, voxels (null), dice, iou
    summaries: pl.DataFrame  # patient_id, target, stat ('mean' | 'var'), value: whole-volume stats
    patient_ids: list[str]
    ignored_columns: list[str] = field(default_factory=list)  # columns no pattern matched


def canonical_name(name: str) -> str:
    """Our spelling of a reference class name ('vertebraes' -> 'vertebrae')."""
    return REFERENCE_ALIASES.get(name, name)


def shared_data_dir() -> Path:
    """The shared data folder: ``$AGG2EXP_SHARED_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def parse_reference_frame(wide: pl.DataFrame, *, method: str = "smoothgrad") -> ReferenceData:
    """Turn the wide reference frame into long importances and predictions.

    Why long: every downstream consumer (store, anomaly, graph, SQL) works on one row per
    (patient, target, roi, stat, sign), so a reference run is comparable with engine runs.
    """
    if "patient" not in wide.columns:
        raise ReferenceFormatError(
            "the CSV has no 'patient' column; expected the reference layout "
            "(patient, {target}_explanation_in_{roi}_mass, ..., {class}_dice)"
        )
    imp_cols: list[tuple[str, str, str, str, str]] = []
    ignored: list[str] = []
    sum_cols: list[tuple[str, str, str]] = []
    q_cols: list[tuple[str, str, str]] = []
    for col in wide.columns:
        if col == "patient":
            continue
        if m := _IMPORTANCE.match(col):
            imp_cols.append((col, canonical_name(m["target"]), canonical_name(m["roi"]), m["stat"],
                             m["sign"] or "abs"))
        elif m := _SUMMARY.match(col):
            sum_cols.append((col, canonical_name(m["target"]), m["stat"]))
        elif m := _QUALITY.match(col):
            q_cols.append((col, canonical_name(m["cls"]), m["metric"]))
        else:
            ignored.append(col)
    if ignored:
        message = (f"the reference CSV has {len(ignored)} column(s) that match no known pattern and are not "
                   f"imported: {', '.join(ignored)}")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    if not imp_cols:
        raise ReferenceFormatError(
            "no '{target}_explanation_in_{roi}_mass|mean' columns found; is this a reference "
            "aggregated-explanations CSV?"
        )
    wide = wide.with_columns(pl.col("patient").cast(pl.String).alias("patient_id"))
    if wide["patient_id"].is_duplicated().any():
        dupes = wide.filter(pl.col("patient_id").is_duplicated())["patient_id"].unique().to_list()
        raise ReferenceFormatError(f"patients appear more than once in the CSV: {sorted(dupes)[:5]}")

    def melt(cols: list[str]) -> pl.DataFrame:
        return wide.select(["patient_id", *cols]).with_columns(pl.col(cols).cast(pl.Float64)).unpivot(
            index="patient_id", on=cols, variable_name="column", value_name="value"
        )

    imp_map = pl.DataFrame(imp_cols, schema=["column", "target", "roi", "stat", "sign"], orient="row")
    importances = (
        melt([c[0] for c in imp_cols])
        .join(imp_map, on="column")
        .select("patient_id", pl.lit(method).alias("method"), "target", "roi", "stat", "sign", "value")
        .sort("patient_id", "target", "roi", "stat", "sign")
    )

    if q_cols:
        q_map = pl.DataFrame(q_cols, schema=["column", "class", "metric"], orient="row")
        predictions = (
            melt([c[0] for c in q_cols])
            .join(q_map, on="column")
            .pivot(on="metric", index=["patient_id", "class"], values="value")
        )
    else:
        predictions = pl.DataFrame(schema={"patient_id": pl.String, "class": pl.String})
    for metric in ("dice", "iou"):
        if metric not in predictions.columns:
            predictions = predictions.with_columns(pl.lit(None, dtype=pl.Float64).alias(metric))
    predictions = predictions.select(
        "patient_id", "class", pl.lit(None, dtype=pl.Int64).alias("voxels"), "dice", "iou"
    ).sort("patient_id", "class")

    if sum_cols:
        s_map = pl.DataFrame(sum_cols, schema=["column", "target", "stat"], orient="row")
        summaries = melt([c[0] for c in sum_cols]).join(s_map, on="column").select(
            "patient_id", "target", "stat", "value"
        )
    else:
        summaries = pl.DataFrame(
            schema={"patient_id": pl.String, "target": pl.String, "stat": pl.String, "value": pl.Float64}
        )
    return ReferenceData(
        importances=importances,
        predictions=predictions,
        summaries=summaries,
        patient_ids=wide["patient_id"].to_list(),
        ignored_columns=ignored,
    )


def read_reference_csv(path: str | os.PathLike[str], *, method: str = "smoothgrad") -> ReferenceData:
    """Read and parse a reference CSV file (see :func:`parse_reference_frame`)."""
    p = Path(path)
    if not p.is_file():
        raise ReferenceFormatError(f"no file at {p}; give the path of a reference aggregated-explanations CSV")
    try:
        wide = pl.read_csv(p, infer_schema_length=None)
    except pl.exceptions.PolarsError as exc:
        raise ReferenceFormatError(f"cannot read {p} as CSV: {exc}") from exc
    # pandas writes an unnamed index column; drop it if present
    wide = wide.drop([c for c in wide.columns if c == "" or c.startswith("Unnamed")])
    return parse_reference_frame(wide, method=method)
