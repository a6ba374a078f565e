"""The results layer at cohort scale: store size, write rate, live reads, and analytics.

Synthetic per-patient results of the real shape (17 targets x 19 RoIs x 2 stats x 3 signs =
1,938 importance rows and 17 prediction rows per patient, with confidence, entropy and input statistics;
masses drawn as Dirichlet shares that
put most weight on the background and the class itself, like a demo run's; 0.5% of patients
planted as outliers with their mass moved to another RoI; metadata site/sex/age) go through the
real writer (``Store.write_patient``, one transaction per patient, as the runtime commits them)
while another *process* opens the store every second and reads through the live endpoint. Then
anomaly scoring, an audit over three metadata columns, the graph and the HTML report run through
the engine's own commands (``agg2exp anomaly|audit|graph|report``), each in a child process whose peak RSS is
measured (and which is stopped if it passes ``--rss-limit-gb``, so a shared machine is safe).

    python benchmarks/store_scale.py --patients 2000 --json store_2000.json

JSON keys: bytes_per_row, write_patients_per_s_first10, write_patients_per_s_last10,
read_latency_p95_s, read_staleness_max_s, anomaly_s, audit_s, graph_s, report_s, peak_rss_gb (and more:
see the ``out`` dict in ``main``). Goals at 100,000 patients on a 2-core machine: <= 12 B/row;
>= 50 patients/s written with the last 10% >= 0.8x the first 10%; reads p95 < 1 s and
staleness <= 2 s; anomaly + audit + graph <= 10 min; peak RSS <= 4 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
RUN = "scale"
EXTRA_ROIS = ("lung", "lung_left")


# --------------------------------------------------------------------------- synthetic results


class Synth:
    """Draws one patient's importances and predictions; keys are built once."""

    def __init__(self, seed: int = 0) -> None:
        from engine.labels import THORAX_CLASSES

        self.targets = list(THORAX_CLASSES)
        self.rois = [*THORAX_CLASSES, *EXTRA_ROIS]
        self.rng = np.random.default_rng(seed)
        t, r = len(self.targets), len(self.rois)
        # concentration: background heavy, the class itself next, neighbours a little
        alpha = np.full((t, r), 0.3)
        alpha[:, 0] = 6.0
        for i in range(t):
            alpha[i, i] += 3.0
        self.alpha = alpha
        self.volume = self.rng.uniform(2e3, 5e5, r)  # RoI sizes in voxels, for the per-voxel means
        self.volume[0] = 4e6
        keys = [(tg, ro, st, sg) for st in ("mass", "mean") for sg in ("abs", "pos", "neg")
                for tg in self.targets for ro in self.rois]
        self.keys = pl.DataFrame(keys, schema=["target", "roi", "stat", "sign"], orient="row").with_columns(
            pl.lit("smoothgrad").alias("method"))
        self.classes = self.targets

    def patient(self, pid: str, *, outlier: bool = False) -> Any:
        from engine.results import PatientResult

        rng = self.rng
        shares = np.empty((3, len(self.targets), len(self.rois)))
        for s in range(3):
            g = rng.gamma(self.alpha)
            shares[s] = g / g.sum(axis=1, keepdims=True)
        if outlier:  # the explanation of every class leans on one unexpected RoI
            k = int(rng.integers(1, len(self.rois)))
            shares[:, :, k] += 0.5
            shares /= shares.sum(axis=2, keepdims=True)
        total = rng.lognormal(0.0, 0.3, (3, len(self.targets), 1))
        means = shares * total / self.volume[None, None, :]
        values = np.concatenate([shares.ravel(), means.ravel()])
        imp = self.keys.with_columns(pl.Series("value", values))
        dice = np.clip(rng.normal(0.92, 0.04, len(self.classes)), 0, 1)
        k = len(self.classes)
        pred = pl.DataFrame({"class": self.classes, "voxels": rng.integers(1_000, 500_000, k),
                             "dice": dice, "iou": dice / (2 - dice), "confidence": rng.uniform(0.8, 1.0, k),
                             "entropy": rng.uniform(0.0, 0.5, k), "input_mean": rng.normal(0.5, 0.1, k),
                             "input_std": rng.uniform(0.01, 0.1, k), "input_local": rng.uniform(0.05, 0.3, k)})
        return PatientResult(patient_id=pid, importances=imp, predictions=pred, worker="bench", seconds=1.0)


def planted(n: int) -> set[int]:
    """Indices of the planted outliers (0.5% of the patients, at least one)."""
    return set(np.random.default_rng(2).choice(n, size=max(1, n // 200), replace=False).tolist())


def detection(db: Path, n: int) -> dict[str, Any]:
    """How the stored anomaly scores rank the planted outliers: ROC AUC, and how many are in the top 0.5%."""
    from sklearn.metrics import roc_auc_score

    from engine import store

    with store.open(db) as s:
        scores = s.sql("SELECT s.patient_id, s.score FROM anomaly_scores AS s JOIN (SELECT model_id FROM "
                       "anomaly_models WHERE run_id = ? ORDER BY created_at DESC LIMIT 1) USING (model_id) "
                       "WHERE s.target = '__mean__' ORDER BY s.score DESC", [RUN])
    out = {f"p{i:06d}" for i in planted(n)}
    y = np.array([p in out for p in scores["patient_id"].to_list()])
    return {"planted_outliers": len(out), "planted_roc_auc": round(float(roc_auc_score(y, scores["score"])), 4),
            "planted_in_top": int(y[:len(out)].sum())}


def manifest(n: int, seed: int = 1) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "patient_id": [f"p{i:06d}" for i in range(n)],
        "image_path": [f"/data/ct/p{i:06d}.nii.gz" for i in range(n)],
        "site": rng.choice(["A", "B", "C"], n),
        "sex": rng.choice(["F", "M"], n),
        "age": rng.integers(20, 90, n),
    })


# --------------------------------------------------------------------------- the reader process


def reader_loop(db: str, out: str, stop: str, interval: float) -> None:
    """Every ``interval`` s: open the store (live while the writer holds it), read, record latency and staleness."""
    from engine import store

    with open(out, "w") as fh:
        while not os.path.exists(stop):
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"t": time.time()}
            try:
                with store.open(db) as s:
                    row = s.sql("SELECT count(*) AS done, max(finished_at) AS last FROM patients "
                                "WHERE run_id = ? AND status = 'done'", [RUN]).row(0, named=True)
                    last_pid = None
                    if row["done"]:
                        last_pid = s.sql("SELECT patient_id FROM patients WHERE run_id = ? AND status = 'done' "
                                         "ORDER BY finished_at DESC LIMIT 1", [RUN]).item()
                        part = s.sql("SELECT target, sum(value) AS mass FROM importances WHERE run_id = ? AND "
                                     "patient_id = ? AND stat = 'mass' AND sign = 'abs' GROUP BY target",
                                     [RUN, last_pid])
                        rec["complete"] = part.height == 17 and bool(((part["mass"] - 1).abs() < 1e-9).all())
                    now = datetime.now(timezone.utc)
                    rec.update(live=s.is_live, done=int(row["done"]),
                               staleness=(now - row["last"]).total_seconds() if row["last"] else None)
            except Exception as exc:  # noqa: BLE001 - recorded and counted, the loop goes on
                rec["error"] = str(exc).splitlines()[0][:200]
            rec["latency"] = time.perf_counter() - t0
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            time.sleep(max(0.0, interval - rec["latency"]))


# --------------------------------------------------------------------------- analytics in child processes


def timed_command(argv: list[str], *, rss_limit_gb: float, timeout: float) -> dict[str, Any]:
    """Run ``python -m engine.cli ARGV`` and return seconds, exit status and peak RSS (GB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed: list[str] = []
    reaped = threading.Event()

    def watch() -> None:
        # Never poll() the child here: that can reap it before os.wait4 below, which then fails.
        while not reaped.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            except (OSError, StopIteration):  # gone, or a zombie (no VmRSS) waiting to be reaped
                return
            if rss_kb > rss_limit_gb * 2**20 or time.perf_counter() - t0 > timeout:
                killed.append("rss" if rss_kb > rss_limit_gb * 2**20 else "timeout")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                return
            reaped.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    reaped.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "exit": proc.returncode, "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "stopped": killed[0] if killed else None, "tail": output[-600:]}


# --------------------------------------------------------------------------- main


def rate(times: list[float]) -> float:
    return len(times) / sum(times) if times else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=2000)
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--db", type=Path, default=None, help="store file (default: a new temporary one)")
    p.add_argument("--read-interval", type=float, default=1.0, help="seconds between the reader's queries")
    p.add_argument("--analytics", choices=("all", "none", "only"), default="all",
                   help="'only': skip writing and time the analytics on the finished store given by --db "
                        "(e.g. one an earlier run with --analytics none wrote)")
    p.add_argument("--n-boot", type=int, default=1000, help="audit bootstrap resamples (the command's default)")
    p.add_argument("--rss-limit-gb", type=float, default=6.0, help="stop an analytics command above this RSS")
    p.add_argument("--analytics-timeout", type=float, default=1800.0)
    p.add_argument("--reader", nargs=3, metavar=("DB", "OUT", "STOP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reader:
        reader_loop(*args.reader, interval=args.read_interval)
        return

    from engine import store

    if args.analytics == "only":
        if args.db is None or not args.db.is_file():
            p.error("--analytics only needs --db, the store of an earlier run of this benchmark")
        analytics_only(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="store_scale_"))
    db = args.db or tmp / "scale.duckdb"
    for leftover in (db, db.with_name(db.name + ".wal")):
        leftover.unlink(missing_ok=True)
    n = args.patients
    synth = Synth(seed=0)
    outliers = planted(n)
    man = manifest(n)
    reads, stop = tmp / "reads.jsonl", tmp / "stop"
    times: list[float] = []
    t_start = time.perf_counter()
    with store.open_writer(db) as w:
        w.create_run(RUN, config={"name": "store-scale", "class_names": synth.targets}, job_name="store-scale")
        t0 = time.perf_counter()
        w.register_patients(RUN, man)
        register_s = time.perf_counter() - t0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        reader = subprocess.Popen([sys.executable, __file__, "--read-interval", str(args.read_interval),
                                   "--reader", str(db), str(reads), str(stop)], env=env)
        gen_s = 0.0
        cpu: list[float] = []  # this process's CPU seconds per write: what the writer costs on an idle core
        for i in range(n):
            g0 = time.perf_counter()
            result = synth.patient(f"p{i:06d}", outlier=i in outliers)
            t0, c0 = time.perf_counter(), time.process_time()
            gen_s += t0 - g0
            w.write_patient(RUN, result)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if (i + 1) % max(1, n // 20) == 0:
                print(f"[write] {i + 1}/{n} patients, last 5%: {rate(times[-max(1, n // 20):]):.1f} patients/s",
                      flush=True)
        write_s = time.perf_counter() - t_start
        time.sleep(2 * args.read_interval)  # let the reader see the finished state
        stop.touch()
        reader.wait(timeout=120)
        t0 = time.perf_counter()
        w.finish_run(RUN, status="done", report={"benchmark": "store_scale"})
        verify_s = time.perf_counter() - t0
        rows = w.table_counts(RUN)
    writer_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    size = db.stat().st_size
    with store.open(db) as s:
        used = s.sql("SELECT total_blocks, block_size, free_blocks FROM pragma_database_size()").row(0, named=True)
    used_bytes = (int(used["total_blocks"]) - int(used["free_blocks"])) * int(used["block_size"])

    recs = [json.loads(line) for line in reads.read_text().splitlines() if line.strip()]
    ok = [r for r in recs if "error" not in r]
    latencies = sorted(r["latency"] for r in ok)
    stale = [r["staleness"] for r in ok if r.get("staleness") is not None and r["done"] < n]
    k = max(1, n // 10)
    out: dict[str, Any] = {
        "patients": n,
        "importance_rows": rows["importances"],
        "rows_per_patient": rows["importances"] // n,
        "file_bytes": size,
        "bytes_per_row": round(size / rows["importances"], 2),
        "used_bytes_per_row": round(used_bytes / rows["importances"], 2),
        "register_s": round(register_s, 2),
        "write_s": round(write_s, 1),
        "generate_s": round(gen_s, 1),
        "write_patients_per_s": round(rate(times), 1),
        "write_patients_per_s_first10": round(rate(times[:k]), 1),
        "write_patients_per_s_last10": round(rate(times[-k:]), 1),
        "write_last10_over_first10": round(rate(times[-k:]) / rate(times[:k]), 3),
        "write_cpu_patients_per_s_first10": round(rate(cpu[:k]), 1),
        "write_cpu_patients_per_s_last10": round(rate(cpu[-k:]), 1),
        "load_average_1min_at_end": os.getloadavg()[0],
        "write_commit_p99_s": round(float(np.quantile(times, 0.99)), 4),
        "write_commit_max_s": round(max(times), 4),
        "verify_unique_s": round(verify_s, 2),
        "reads": len(recs),
        "read_errors": len(recs) - len(ok),
        "read_first_error": next((r["error"] for r in recs if "error" in r), None),
        "reads_live": sum(1 for r in ok if r.get("live")),
        "reads_incomplete_patient": sum(1 for r in ok if r.get("complete") is False),
        "read_latency_median_s": round(statistics.median(latencies), 4) if latencies else None,
        "read_latency_p95_s": round(float(np.quantile(latencies, 0.95)), 4) if latencies else None,
        "read_staleness_max_s": round(max(stale), 3) if stale else None,
        "writer_peak_rss_gb": round(writer_rss_gb, 3),
        "anomaly_s": None, "audit_s": None, "graph_s": None,
    }
    print(json.dumps(out, indent=1), flush=True)
    analytics = run_analytics(args, db, tmp, out) if args.analytics == "all" else {}
    out["peak_rss_gb"] = round(max([writer_rss_gb, *(r["peak_rss_gb"] for r in analytics.values())]), 3)
    finish(args, db, out)


def run_analytics(args: argparse.Namespace, db: Path, tmp: Path, out: dict[str, Any]) -> dict[str, Any]:
    """Anomaly scoring, the audit over three metadata columns and the graph, each timed in a child process."""
    analytics: dict[str, Any] = {}
    common = {"rss_limit_gb": args.rss_limit_gb, "timeout": args.analytics_timeout}
    analytics["anomaly"] = timed_command(["anomaly", "--run", RUN, "--db", str(db)], **common)
    analytics["audit"] = timed_command(["audit", "--run", RUN, "--by", "site,sex,age", "--n-boot",
                                        str(args.n_boot), "--db", str(db)], **common)
    analytics["graph"] = timed_command(["graph", "--run", RUN, "--out", str(tmp / "graph"), "--db", str(db)],
                                       **common)
    # the HTML report too (no maps: the synthetic patients have no volumes); not in the goal's total
    analytics["report"] = timed_command(["report", "--run", RUN, "--out", str(tmp / "report"), "--no-maps",
                                         "--db", str(db)], **common)
    if analytics["anomaly"]["exit"] == 0:
        out.update(detection(db, out["patients"]))
        print(f"[anomaly] planted outliers: ROC AUC {out['planted_roc_auc']}, {out['planted_in_top']} of "
              f"{out['planted_outliers']} in the top {out['planted_outliers']}", flush=True)
    for name, res in analytics.items():
        print(f"[{name}] {res['seconds']} s, exit {res['exit']}, peak RSS {res['peak_rss_gb']} GB"
              + (f", stopped ({res['stopped']})" if res["stopped"] else ""), flush=True)
        out[f"{name}_s"] = res["seconds"] if res["exit"] == 0 else None
    out["analytics"] = analytics
    goal = [analytics[k] for k in ("anomaly", "audit", "graph")]
    out["analytics_total_s"] = (round(sum(r["seconds"] for r in goal), 1) if all(r["exit"] == 0 for r in goal)
                                else None)
    out["analytics_peak_rss_gb"] = round(max(r["peak_rss_gb"] for r in analytics.values()), 3)
    return analytics


def analytics_only(args: argparse.Namespace) -> None:
    """Time the analytics on a store this benchmark wrote before (no writing, no reader)."""
    from engine import store

    with store.open(args.db) as s:
        n = int(s.sql("SELECT count(*) FROM patients WHERE run_id = ? AND status = 'done'", [RUN]).item())
        rows = int(s.sql("SELECT count(*) FROM importances WHERE run_id = ?", [RUN]).item())
    if not n:
        raise SystemExit(f"{args.db} holds no finished patients of run {RUN!r}; write it first with --analytics none")
    out: dict[str, Any] = {"patients": n, "importance_rows": rows, "analytics_only": True,
                           "bytes_per_row": round(args.db.stat().st_size / rows, 2)}
    tmp = Path(tempfile.mkdtemp(prefix="store_scale_"))
    analytics = run_analytics(args, args.db, tmp, out)
    out["peak_rss_gb"] = round(max(r["peak_rss_gb"] for r in analytics.values()), 3)
    finish(args, args.db, out)


def finish(args: argparse.Namespace, db: Path, out: dict[str, Any]) -> None:
    out.setdefault("load_average_1min_at_end", os.getloadavg()[0])
    out["machine"] = f"{os.cpu_count()}-core shared dev machine"
    out["db"] = str(db)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "analytics"}, indent=1))


if __name__ == "__main__":
    main()
