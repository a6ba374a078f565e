"""A self-contained HTML report of one run: one file, PNGs embedded as base64, no network needed.

Sections (stable ids, in order): ``summary`` (configuration, versions, counts, timings, failures),
``distributions`` (Fig. 3), ``graph`` (Fig. 4 and the edge rule), ``anomalies`` (ranking and the
most/least anomalous patients, Fig. 5), ``audits`` (stored bias audits) and ``evaluation``
(stored evaluations). A section with nothing to show says why and what to run.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from engine import store as store_mod
from engine.vocabulary import MEAN_TARGET
from engine.report import figures
from engine.vocabulary import safe_filename

SECTION_IDS: tuple[str, ...] = ("summary", "distributions", "graph", "anomalies", "audits", "evaluation")
#: Patients drawn as dots in Fig. 3 (the boxes are of every patient).
_DOTS = 400
#: Failed patients whose tracebacks the summary shows (all are in ``patients.traceback``).
_TRACEBACKS = 20

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#cfd8dc;font-size:13px}
nav{background:#37474f;padding:6px 28px;position:sticky;top:0;z-index:2}
nav a{color:#eceff1;margin-right:18px;text-decoration:none;font-size:13px}
main{padding:8px 28px 40px;max-width:1240px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 18px 16px;margin:16px 0}
h2{font-size:18px;border-bottom:2px solid #eceff1;padding-bottom:4px} h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f5f5f5;padding:8px;font-size:11px;overflow:auto;max-height:420px}
.note{color:#555;font-size:13px} .warn{color:#a04000;font-size:13px}
.kv{display:flex;flex-wrap:wrap;gap:18px} .kv>div{min-width:260px}
.bad{color:#b71c1c;font-weight:600} .good{color:#1b5e20}
figure{margin:8px 0} figcaption{font-size:12px;color:#555;margin-top:4px}
"""


# --------------------------------------------------------------------------- html helpers


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if v == 0:
            return "0"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.3e}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def table(df: pl.DataFrame, *, max_rows: int = 200, cls: str = "") -> str:
    """An HTML table of a frame (numbers right-aligned, at most ``max_rows`` rows)."""
    if df.height == 0:
        return '<p class="note">(no rows)</p>'
    shown = df.head(max_rows)
    numeric = {c for c, t in zip(shown.columns, shown.dtypes) if t.is_numeric()}
    head = "".join(f"<th>{_e(c)}</th>" for c in shown.columns)
    rows = []
    for rec in shown.iter_rows():
        cells = "".join(
            f'<td class="num">{_e(_fmt(v))}</td>' if c in numeric else f"<td>{_e(_fmt(v))}</td>"
            for c, v in zip(shown.columns, rec)
        )
        rows.append(f"<tr>{cells}</tr>")
    more = f'<p class="note">{df.height - max_rows} more rows not shown</p>' if df.height > max_rows else ""
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'


def kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in items.items())
    return f"<table>{rows}</table>"


def img_tag(png: bytes, alt: str, *, caption: str | None = None, width: int | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    style = f' style="width:{width}px"' if width else ""
    return f'<figure><img alt="{_e(alt)}"{style} src="data:image/png;base64,{data}">{cap}</figure>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>\n{body}\n</section>'


# --------------------------------------------------------------------------- data helpers


def choose_method(methods: Sequence[str], config: Mapping[str, Any] | None) -> str | None:
    """The run's configured method when the run has rows of it, else the only (or first) method."""
    if not methods:
        return None
    methods = sorted(methods)
    configured = ((config or {}).get("attribution") or {}).get("method") or (config or {}).get("method")
    if configured in methods:
        return str(configured)
    return methods[0]


def split_top_bottom(mean_scores: pl.DataFrame, top_k: int) -> tuple[list[str], list[str]]:
    """Most anomalous ``top_k`` ids (highest first) and least anomalous ``top_k`` (lowest last), disjoint."""
    s = mean_scores.sort(["score", "patient_id"], descending=[True, False])
    ids = s["patient_id"].cast(pl.String).to_list()
    top = ids[: min(top_k, len(ids))]
    rest = [p for p in ids if p not in top]
    bottom = rest[-top_k:] if top_k > 0 else []
    return top, bottom


def display_target(scores: pl.DataFrame, patient_id: str, available: Sequence[str] | None = None) -> str | None:
    """The class whose explanation is most anomalous for this patient (highest per-class score)."""
    s = scores.filter((pl.col("patient_id") == patient_id) & (pl.col("target") != MEAN_TARGET))
    if available is not None:
        s = s.filter(pl.col("target").is_in(list(available)))
    s = s.filter(pl.col("target") != "background").sort("score", descending=True)
    return str(s["target"][0]) if s.height else None


# --------------------------------------------------------------------------- sections


def _summary(s: store_mod.Store, run_id: str, info: Mapping[str, Any], patients: pl.DataFrame) -> str:
    counts = s.status_counts(run_id)
    rows = s.table_counts(run_id)
    started, finished = info.get("started_at"), info.get("finished_at")
    duration = None
    if isinstance(started, datetime) and isinstance(finished, datetime):
        duration = round((finished - started).total_seconds(), 2)
    report = info.get("report") or {}
    config = dict(info.get("config") or {})
    attribution = config.get("attribution") or {}
    overview = {
        "run": run_id, "kind": info.get("kind"), "job": info.get("job_name"), "status": info.get("status"),
        "started": started, "finished": finished, "wall seconds": report.get("seconds", duration),
        "model": json.dumps(config.get("model")) if config.get("model") else None,
        "method": attribution.get("method") or config.get("method"),
        "precision": _precision(config),
        "store": str(s.path) + (" (live: a job is writing it)" if s.is_live else ""),
    }
    parts = ['<div class="kv">', "<div><h3>Run</h3>", kv_table({k: v for k, v in overview.items() if v is not None}),
             "</div>", "<div><h3>Patients</h3>", kv_table(counts), "<h3>Rows</h3>", kv_table(rows), "</div>"]
    versions = info.get("versions") or {}
    if versions:
        parts += ["<div><h3>Versions</h3>", kv_table(versions), "</div>"]
    parts.append("</div>")

    # timings: the run report's stage summary, and per-patient seconds from the patients table
    parts.append("<h3>Timings</h3>")
    done = patients.filter(pl.col("status") == "done") if patients.height else patients
    if done.height and "seconds" in done.columns and done["seconds"].drop_nulls().len():
        sec = done["seconds"].drop_nulls()
        stats = {"patients timed": sec.len(), "mean s/patient": float(sec.mean()), "median s/patient": float(sec.median()),
                 "max s/patient": float(sec.max()), "total patient-seconds": float(sec.sum())}
        stage_rows: dict[str, list[float]] = {}
        for t in done["timings"].drop_nulls().to_list() if "timings" in done.columns else []:
            try:
                d = json.loads(t) if isinstance(t, str) else dict(t)
            except (TypeError, ValueError):
                continue
            for k, v in d.items():
                if isinstance(v, (int, float)) and not k.startswith("work_"):
                    stage_rows.setdefault(k, []).append(float(v))
        parts.append(kv_table(stats))
        if stage_rows:
            stage = pl.DataFrame({"stage": list(stage_rows), "patients": [len(v) for v in stage_rows.values()],
                                  "mean_s": [sum(v) / len(v) for v in stage_rows.values()],
                                  "max_s": [max(v) for v in stage_rows.values()]})
            parts.append(table(stage))
    else:
        parts.append('<p class="note">no per-patient timings stored (an imported run, or nothing done yet)</p>')
    if isinstance(report.get("timings"), Mapping) and report.get("timings"):
        parts.append("<details><summary>run report timings</summary><pre>"
                     + _e(json.dumps(report["timings"], indent=2, default=str)) + "</pre></details>")

    # failures
    parts.append("<h3>Failures</h3>")
    failed = patients.filter(pl.col("status") == "failed") if patients.height else patients
    if failed.height:
        cols = [c for c in ("patient_id", "error", "attempts", "worker", "image_path") if c in failed.columns]
        parts.append(f'<p class="bad">{failed.height} patient(s) failed</p>' + table(failed.select(cols)))
        traced = failed.filter(pl.col("traceback").is_not_null()) if "traceback" in failed.columns else failed.head(0)
        if traced.height > _TRACEBACKS:
            parts.append(f'<p class="note">the tracebacks of the first {_TRACEBACKS} of {traced.height}; the rest are in '
                         "<code>patients.traceback</code></p>")
        for rec in traced.head(_TRACEBACKS).iter_rows(named=True):
            if rec.get("traceback"):
                parts.append(f"<details><summary>traceback of {_e(rec['patient_id'])}</summary>"
                             f"<pre>{_e(rec['traceback'])}</pre></details>")
    else:
        parts.append('<p class="good">no failed patients</p>')

    parts.append("<details><summary>configuration</summary><pre>"
                 + _e(json.dumps(config, indent=2, default=str)) + "</pre></details>")
    if report:
        slim = {k: v for k, v in report.items() if k not in ("configuration", "timings")}
        parts.append("<details><summary>run report</summary><pre>"
                     + _e(json.dumps(slim, indent=2, default=str)) + "</pre></details>")
    return section("summary", "Run summary", "\n".join(parts))


def _distributions(s: store_mod.Store, run_id: str, method: str | None, saved: dict[str, bytes]) -> str:
    title = "Local RoI importance (Fig. 3)"
    if method is None:
        return section("distributions", title, '<p class="note">the run holds no importance rows yet</p>')
    # the boxes are DuckDB's statistics over every done patient, the dots those of at most _DOTS of them:
    # the cohort never leaves the store
    stats = s.importance_box_stats(run_id, method=method)
    points = s.importance_points(run_id, method=method, patients=_DOTS)
    n = int(stats["n"].max()) if stats.height else 0
    png = figures.to_png(figures.distribution_figure(stats, points, n_patients=n, what=f"method={method}"))
    saved["distributions.png"] = png
    dots = points["patient_id"].n_unique()
    who = f"one dot per patient ({n} patients)" if dots >= n else f"one dot per patient for {dots} of the {n} patients"
    body = (f'<p class="note">For each explained class (panel), the share of its attribution mass (|{_e(method)}|, '
            f"stat <code>mass</code>, sign <code>abs</code>) that falls in each RoI: boxes over every done patient, "
            f"{who}, coloured by anatomical group.</p>"
            + img_tag(png, "distributions of local RoI importance per class"))
    return section("distributions", title, body)


def _rule_text(rule: str, opts: Mapping[str, Any]) -> str:
    if rule == "topk":
        text = f"top-k: for each explained class, its {opts.get('k', 5)} heaviest RoIs"
    elif rule == "quantile":
        text = (f"quantile: edges whose weight is above the {opts.get('quantile', 0.75)} quantile of all "
                "candidate weights")
    else:
        text = (f"cumulative: for each explained class, RoIs sorted by weight are kept while the running sum "
                f"stays &le; {opts.get('threshold', 0.35)}")
    bg = "background excluded" if opts.get("exclude_background", True) else "background kept"
    se = "self-edges kept" if opts.get("self_edges", True) else "self-edges dropped"
    return f"{text}; weight = cohort-mean attribution mass (sign abs); {bg}; {se}"


def _graph(s: store_mod.Store, run_id: str, method: str | None, rule: str, opts: Mapping[str, Any],
           saved: dict[str, bytes]) -> str:
    from engine.analytics.graph import GraphError, graph_run

    title = "Global RoI importance graph (Fig. 4)"
    if method is None:
        return section("graph", title, '<p class="note">the run holds no importance rows yet</p>')
    try:  # the same SQL aggregates as `agg2exp graph`
        graphs, _ = graph_run(s, run_id=run_id, method=method, rule=rule, **opts)
    except GraphError as exc:
        return section("graph", title, f'<p class="warn">the graph cannot be built: {_e(exc)}</p>')
    edges = graphs["all"]
    png = figures.graph_figure(edges, title=f"{run_id}: {rule}")
    saved["graph.png"] = png
    body = (f"<p>Edge rule: <b>{_rule_text(rule, opts)}</b>. An edge <code>roi &rarr; class</code> means the "
            f"explanation of the class puts much of its mass in the RoI. {edges.height} edges kept.</p>"
            + img_tag(png, "global RoI importance graph", width=620)
            + "<details><summary>kept edges</summary>" + table(edges, max_rows=400) + "</details>")
    return section("graph", title, body)


def _panels_for(
    s: store_mod.Store, run_id: str, config: Mapping[str, Any], scores: pl.DataFrame, patients: pl.DataFrame,
    ids: Sequence[str], kinds: Mapping[str, str], *, recompute: bool, device: str | None,
) -> tuple[list[figures.PatientPanel], str | None]:
    """Fig. 5 rows for ``ids``; the second value explains why there are no overlays (None if there are)."""
    from engine import io
    from engine.report.maps import MapRecomputer, MapsUnavailable

    mean = dict(zip(scores.filter(pl.col("target") == MEAN_TARGET)["patient_id"].cast(pl.String).to_list(),
                    scores.filter(pl.col("target") == MEAN_TARGET)["score"].to_list()))
    records = s.manifest_records(run_id, ids)
    recomputer = None
    reason: str | None = None
    if recompute:
        try:
            recomputer = MapRecomputer(config, device=device)
        except MapsUnavailable as exc:
            reason = str(exc)
    else:
        reason = "map recomputation was switched off"
    panels = []
    for pid in ids:
        target = display_target(scores, pid, recomputer.class_names if recomputer else None)
        title = f"{kinds.get(pid, '')} {pid} - anomaly score {mean.get(pid, float('nan')):.3f}".strip()
        record = records.get(pid)
        panel = figures.PatientPanel(patient_id=pid, title=title)
        if record is None:
            panel.note = "patient not in the patients table"
            panels.append(panel)
            continue
        try:
            if recomputer is not None and target is not None:
                pm = recomputer.compute(record, [target])
                panel.image = pm.case.image
                panel.prediction = pm.explanation.prediction
                panel.label = list(pm.class_names).index(target)
                maps = pm.explanation.maps or {}
                if target in maps:
                    panel.attribution = maps[target]
                    panel.title += f" - {pm.method} map of {target} (its most anomalous class)"
                else:
                    panel.note = f"{target} is not predicted in this patient, so it has no map"
            else:
                if recomputer is not None:
                    case = recomputer.load_case(record)
                else:
                    if not record.get("image_path"):
                        raise MapsUnavailable("no image path stored for this patient")
                    case = io.load_case(record, preprocess=io.PreprocessSpec.from_dict(config.get("preprocess")))
                panel.image = case.image
                if case.label is not None and target is not None:
                    names = list(config.get("class_names") or [])
                    if target in names:
                        panel.prediction, panel.label = case.label, names.index(target)
                panel.note = "slices without attribution overlay" + (f" ({target})" if target else "")
        except Exception as exc:  # noqa: BLE001 - one unreadable patient must not stop the report
            panel.image = None
            panel.note = f"cannot show this patient: {exc}"
        panels.append(panel)
    return panels, reason


def _anomalies(
    s: store_mod.Store, run_id: str, config: Mapping[str, Any], patients: pl.DataFrame, top_k: int,
    saved: dict[str, bytes], *, recompute: bool, device: str | None,
) -> str:
    title = "Anomalous explanations (Fig. 5)"
    model_id = s.latest_anomaly_model(run_id)
    if model_id is None:
        return section("anomalies", title, f'<p class="note">run {_e(run_id)} has no anomaly scores; run '
                       f"<code>agg2exp anomaly --run {_e(run_id)}</code> first</p>")
    scores = s.anomaly_model_scores(run_id, model_id).with_columns(pl.col("patient_id").cast(pl.String))
    model = s.anomaly_model(model_id)
    mean = scores.filter(pl.col("target") == MEAN_TARGET).select("patient_id", "score", "decision")
    top, bottom = split_top_bottom(mean, top_k)
    kinds = {p: f"#{i + 1} most anomalous" for i, p in enumerate(top)}
    kinds.update({p: f"#{len(bottom) - i} least anomalous" for i, p in enumerate(bottom)})

    metadata = s.patient_metadata(run_id, status=None)
    meta_cols = [c for c in metadata.columns if c != "patient_id"]
    note_col = next((c for c in ("anomaly_type", "anomaly") if c in meta_cols), None)
    labels = None
    if note_col:
        labels = {str(r["patient_id"]): ("" if r[note_col] in (None, False, "none") else f"[{r[note_col]}]")
                  for r in metadata.iter_rows(named=True)}
    png = figures.to_png(figures.anomaly_ranking(scores, top_k=top_k, labels=labels))
    saved["anomaly_ranking.png"] = png

    dice = s.patient_dice(run_id)
    ranked = mean.sort("score", descending=True).with_row_index("rank", offset=1)
    if dice.height:
        ranked = ranked.join(dice.with_columns(pl.col("patient_id").cast(pl.String)), on="patient_id", how="left")
    if meta_cols:
        ranked = ranked.join(metadata,
                             on="patient_id", how="left")
    from engine.analytics.anomaly import reasons_by_patient

    why = reasons_by_patient(s.anomaly_reasons(run_id, model_id))
    ranked = ranked.with_columns(pl.col("patient_id").replace_strict(why, default=None, return_dtype=pl.String)
                                 .alias("top reasons (robust z)"))
    shown = ranked.filter(pl.col("patient_id").is_in(top + bottom))

    rho = model.get("spearman_dice")
    info = {"model": model_id, "scorer": model.get("scorer"), "feature set": model.get("feature_set"),
            "mode": model.get("mode"), "fitted on run": model.get("fit_run_id"),
            "method": model.get("method"), "sign": model.get("sign"),
            "Spearman(mean score, mean Dice)": rho, "p": model.get("spearman_p")}
    panels, reason = _panels_for(s, run_id, config, scores, patients, top + bottom, kinds,
                                 recompute=recompute, device=device)
    panel_png = figures.to_png(figures.patient_panels(panels))
    saved["anomalous_patients.png"] = panel_png
    overlay_note = ""
    if reason:
        overlay_note = f'<p class="warn">No attribution overlays: {_e(reason)}. Slices are shown without them.</p>'
    elif not any(p.attribution is not None for p in panels):
        overlay_note = '<p class="warn">No attribution overlays could be drawn for these patients (see each row).</p>'
    body = (
        _scorer_sentence(model)
        + kv_table({k: v for k, v in info.items() if v is not None})
        + img_tag(png, "anomaly ranking", caption=f"red: {len(top)} most anomalous, blue: {len(bottom)} least anomalous")
        + f"<h3>Top {len(top)} and bottom {len(bottom)} patients</h3>" + table(shown)
        + overlay_note
        + img_tag(panel_png, "most and least anomalous patients", width=900,
                  caption="Orthogonal slices through the shown class (its predicted mask outlined in green); "
                          "attribution in red (positive) / blue (negative).")
        + "<details><summary>all patients</summary>" + table(ranked, max_rows=1000) + "</details>"
    )
    return section("anomalies", title, body)


def _scorer_sentence(model: Mapping[str, Any]) -> str:
    if (model.get("scorer") or "paper") == "paper":
        text = ("One isolation forest per class on the patients' RoI mass vectors (the paper's mode); a patient's "
                "score is the mean over classes (higher = more anomalous explanation).")
    else:
        from engine.analytics.scoring import FEATURE_SETS

        words = {"mass_abs": "RoI masses", "mass_pos": "positive RoI masses", "mass_neg": "negative RoI masses",
                 "mean_abs": "mean RoI importances", "pred_voxels": "what the model predicted (volume, confidence, "
                 "entropy)", "input_mean": "the input over each predicted class (mean, spread)",
                 "input_local": "its local contrast (small things a mean hides)"}
        kinds = FEATURE_SETS.get(str(model.get("feature_set")), ())
        described = ", ".join(words[k] for k in kinds if k in words) or "its features"
        how = (" One k-NN per block of features (explanation, prediction, input level, input detail); a "
               "patient's score is the mean of its robust z-scores over the blocks."
               if model.get("scorer") == "blocks" else "")
        text = (f"Scorer <code>{_e(model.get('scorer'))}</code> on the feature set "
                f"<code>{_e(model.get('feature_set'))}</code> ({_e(described)}); "
                f"higher = more anomalous.{how} Per-class scores are the root-mean-square robust z of the class's "
                "features.")
    return f"<p>{text} The reasons are each patient's features furthest from the fit cohort (robust z-scores).</p>"


def _precision(config: Mapping[str, Any]) -> str | None:
    """How the run's attributions were computed: its autocast dtype, exact fp32, or None when not recorded."""
    from engine.analytics.audit import recorded_explainer

    explainer = recorded_explainer(config)
    if explainer is None:
        return None
    return f"{explainer['autocast']} autocast" if explainer.get("autocast") else "exact fp32"


def _audits(s: store_mod.Store, run_id: str, info: Mapping[str, Any]) -> str:
    from engine.analytics.audit import precision_note

    title = "Bias audits"
    df = s.audits(run_id)
    if df.height == 0:
        return section("audits", title, f'<p class="note">no audit stored for this run; run '
                       f"<code>agg2exp audit --run {_e(run_id)} --by COLUMNS</code> to add one</p>")
    parts = []
    note = precision_note(info)
    if note:
        parts.append(f'<p class="warn">{_e(note.removeprefix("note: "))}</p>')
    cols = [c for c in ("rank", "column", "family", "target", "roi", "test", "groups", "n", "statistic", "p_value",
                        "q_value", "effect", "effect_size", "ci_low", "ci_high", "significant") if c in df.columns]
    for (audit_id,), part in df.group_by(["audit_id"], maintain_order=True):
        params = part["params"][0] if "params" in part.columns else None
        n_sig = int(part["significant"].sum()) if "significant" in part.columns else 0
        parts.append(f"<h3>{_e(audit_id)}</h3><p class=\"note\">{part.height} tests, {n_sig} significant; "
                     f"parameters: <code>{_e(params)}</code></p>")
        for (column,), sub in part.group_by(["column"], maintain_order=True):
            parts.append(f"<h4>{_e(column)}</h4>" + table(sub.sort("rank").select(cols), max_rows=15))
    return section("audits", title, "\n".join(parts))


def _evaluation(s: store_mod.Store, run_id: str) -> str:
    title = "Evaluation"
    df = s.evaluations(run_id)
    if df.height == 0:
        return section("evaluation", title, '<p class="note">no evaluations stored for this run; run '
                       f"<code>agg2exp evaluate --run {_e(run_id)}</code> to add one</p>")
    key = next((c for c in ("evaluation_id", "eval_id", "kind", "metric_group") if c in df.columns), None)
    parts = []
    if key:
        for (k,), part in df.group_by([key], maintain_order=True):
            parts.append(f"<h3>{_e(k)}</h3>" + table(part.drop(key), max_rows=100))
    else:
        parts.append(table(df, max_rows=200))
    return section("evaluation", title, "\n".join(parts))


# --------------------------------------------------------------------------- entry point


def write_report(
    db: str | os.PathLike[str] | store_mod.Store,
    *,
    run_id: str | None = None,
    out_dir: str | os.PathLike[str],
    top_k: int = 3,
    graph_rule: str = "cumulative",
    graph_options: Mapping[str, Any] | None = None,
    recompute_maps: bool = True,
    device: str | None = "cpu",
    save_figures: bool = True,
) -> Path:
    """Write ``<out_dir>/report-<run>.html`` for one run (the latest when ``run_id`` is None).

    ``db`` is a store path or an open :class:`~engine.store.Store`. Maps for the Fig. 5 patients
    are recomputed with the run's model and configuration (``recompute_maps``); when the model
    cannot be loaded the slices are shown without overlays and the report says why. With
    ``save_figures`` the PNGs are also written to ``<out_dir>/figures/``. Returns the HTML path.
    """
    t0 = time.perf_counter()
    own = not isinstance(db, store_mod.Store)
    s = store_mod.open(db) if own else db  # type: ignore[arg-type]
    try:
        rid = s.require_run(run_id)
        info = s.run_info(rid)
        config = dict(info.get("config") or {})
        patients = s.patients(rid)
        if patients.height:
            patients = patients.with_columns(pl.col("patient_id").cast(pl.String))
        method = choose_method(s.importance_methods(rid), config)
        opts = {"threshold": 0.35, "k": 5, "quantile": 0.75} | dict(graph_options or {})
        saved: dict[str, bytes] = {}
        body = [
            _summary(s, rid, info, patients),
            _distributions(s, rid, method, saved),
            _graph(s, rid, method, graph_rule, opts, saved),
            _anomalies(s, rid, config, patients, top_k, saved, recompute=recompute_maps, device=device),
            _audits(s, rid, info),
            _evaluation(s, rid),
        ]
    finally:
        if own:
            s.close()
    nav = "".join(f'<a href="#{i}">{i}</a>' for i in SECTION_IDS)
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Agg2Exp report - {_e(rid)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>Agg2Exp report: {_e(rid)}</h1><p>generated {_e(generated)} in "
        f"{time.perf_counter() - t0:.1f} s; method {_e(method)}</p></header>"
        f"<nav>{nav}</nav><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = safe_filename(rid)
    path = out / f"report-{safe}.html"
    path.write_text(doc, encoding="utf-8")
    if save_figures:
        (out / "figures").mkdir(exist_ok=True)
        for name, png in saved.items():
            (out / "figures" / name).write_bytes(png)
    return path


__all__ = ["SECTION_IDS", "write_report", "choose_method", "split_top_bottom", "display_target", "table"]
