"""Runs on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, every node
on 127.0.0.1): nodes lost and joining mid-run, the only node lost, GPUs declared as resources,
the driver killed, and a volume that kills its worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from engine import store
from engine.cli import main as cli_main
from engine.commands.run import print_summary
from engine.jobs import JobSpec
from engine.runtime import run_job
from tests.runtime.conftest import assert_same_importances, job_dict, write_job

pytestmark = pytest.mark.slow

NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A head node that hosts no actor (0 CPUs); tests add worker nodes. Shut down after the test."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **NODE})
    try:
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def lose_node(cluster: Any, node: Any) -> None:
    """Lose ``node`` as a lost machine would: SIGKILL its raylet and every process under it.

    ``remove_node`` kills the raylet and its agents only; the actors' worker processes notice
    that about a second later, and meanwhile keep serving the driver (which talks to them
    directly), so on a fast cohort a "lost" node could finish the run.
    """
    raylets = [info.process.pid for info in node.all_processes.get("raylet", [])]
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    doomed, todo = [], list(raylets)
    while todo:
        pid = todo.pop()
        doomed.append(pid)
        todo.extend(children.get(pid, []))
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=False)


def _stored(db: Path, run_id: str) -> pl.DataFrame:
    with store.open(db) as s:
        return s.importances(run_id).drop("run_id")  # type: ignore[union-attr]


def _spec(manifest: Path, **runtime: object) -> JobSpec:
    return JobSpec.from_dict(job_dict(manifest, runtime={"workers": None, **runtime}, anomaly={"enabled": False}))


def test_losing_the_only_worker_node_stops_the_run_in_time_and_a_rerun_resumes(
    tmp_path, cluster, cohort, cohort_manifest, reference_rows, capsys
):
    node = cluster.add_node(num_cpus=1, **NODE)
    db = tmp_path / "lost.duckdb"
    killed_at: list[float] = []

    def kill_the_node(pid: str, status: str) -> None:
        if not killed_at:
            lose_node(cluster, node)  # SIGKILL: raylet, agents and workers, as a lost spot node
            killed_at.append(time.monotonic())

    spec = _spec(cohort_manifest, worker_timeout_s=15)
    summary = run_job(spec, db=db, run_id="lost", address=cluster.address, progress=False, on_result=kill_the_node)
    stopped_after = time.monotonic() - killed_at[0]
    assert summary.exit_code == 3 and summary.stopped and "no worker" in summary.stopped
    assert stopped_after < 15 + 30, stopped_after  # the time limit plus Ray noticing the loss
    done = summary.counts["done"]
    assert 1 <= done < cohort.height and summary.counts["pending"] == cohort.height - done
    assert summary.counts["failed"] == 0
    print_summary(summary)
    err = capsys.readouterr().err
    assert "stopped before finishing" in err and "rerun the same command to resume" in err
    assert any((a["stop_reason"] or "").startswith("lost") for a in summary.report["actors"])

    cluster.add_node(num_cpus=1, **NODE)
    again = run_job(spec, db=db, run_id="lost", address=cluster.address, progress=False)
    assert again.exit_code == 0 and again.skipped_done == done and again.counts["done"] == cohort.height
    assert_same_importances(_stored(db, "lost"), reference_rows)


def test_one_actor_per_declared_gpu_across_nodes_each_with_its_own_device_and_cpus(tmp_path, cluster, cohort_manifest):
    for _ in range(2):
        cluster.add_node(num_cpus=4, num_gpus=2, **NODE)  # GPUs as resources: Ray sets CUDA_VISIBLE_DEVICES
    spec = _spec(cohort_manifest, threads_per_worker=2, cpu_heap="keep-all")  # the job's heap, on every node
    summary = run_job(spec, db=tmp_path / "gpu.duckdb", run_id="gpu", address=cluster.address, progress=False)
    assert summary.exit_code == 0
    placed = [a for a in summary.report["actors"] if a["started_at"]]
    assert len(placed) == 4  # one per declared GPU, on both nodes
    for a in placed:
        assert a["assigned_resources"] == {"CPU": 2.0, "GPU": 1.0}
        assert a["gpu_ids"] == [a["cuda_visible_devices"]]  # exactly one GPU visible: its own
    by_node: dict[str, set[str]] = {}
    for a in placed:
        by_node.setdefault(a["node_id"], set()).add(a["cuda_visible_devices"])
    assert sorted(map(sorted, by_node.values())) == [["0", "1"], ["0", "1"]]
    assert all(a["torch_threads"] == 2 for a in summary.report["actors"] if a["ready_at"])
    from engine.runtime import heap

    tuned = "glibc thresholds set, no block mapped" if heap._glibc() else "the C library is not glibc: nothing to tune"
    assert all(a["cpu_heap"].startswith(tuned) for a in summary.report["actors"] if a["ready_at"])


def _copies(tmp_path: Path, cohort: pl.DataFrame, reference_rows: pl.DataFrame, n: int) -> tuple[Path, pl.DataFrame]:
    """``n`` copies of the six phantoms (each volume under n ids), and their reference rows."""
    rows = pl.concat([cohort.with_columns(pl.col("patient_id") + f"-{k}") for k in range(n)])
    path = tmp_path / f"x{n}.csv"
    rows.write_csv(path)
    ref = pl.concat([reference_rows.with_columns(pl.col("patient_id") + f"-{k}") for k in range(n)])
    return path, ref


def test_a_lost_worker_node_costs_nothing_and_a_node_that_joins_gets_an_actor(
    tmp_path, cluster, cohort, reference_rows
):
    # 24 patients: after the node joins (at the first result) the others need about 10 s on the
    # one surviving actor, twice what the joined node takes to place an actor and load the model
    # (measured 4.5 s), so the joined actor gets work (12 patients left about 1 s of margin).
    manifest, reference = _copies(tmp_path, cohort, reference_rows, 4)
    lost = cluster.add_node(num_cpus=1, **NODE)
    cluster.add_node(num_cpus=1, **NODE)
    joined: list[str] = []

    def churn(pid: str, status: str) -> None:
        if not joined:
            joined.append(cluster.add_node(num_cpus=1, **NODE).node_id)
        elif len(joined) == 1:
            lose_node(cluster, lost)
            joined.append("removed")

    db = tmp_path / "churn.duckdb"
    summary = run_job(_spec(manifest), db=db, run_id="churn", address=cluster.address, progress=False, on_result=churn)
    assert summary.exit_code == 0 and summary.counts["done"] == 24 and summary.counts["failed"] == 0
    actors = summary.report["actors"]
    on_lost = [a for a in actors if a["node_id"] == lost.node_id]
    assert on_lost and all(a["stop_reason"].startswith("lost") for a in on_lost)
    assert any(a["node_id"] == joined[0] and a["patients_done"] >= 1 for a in actors), actors
    assert summary.report["attempts_charged"] == 0
    assert_same_importances(_stored(db, "churn"), reference)  # everything once, nothing duplicated


def _done(db: Path, run_id: str) -> int:
    try:
        with store.open(db) as s:
            return len(s.patient_ids(run_id, status=["done"]))
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def test_a_killed_driver_is_resumed_against_the_same_cluster(tmp_path, cluster, cohort, cohort_manifest, reference_rows,
                                                             capsys):
    cluster.add_node(num_cpus=1, **NODE)
    job = write_job(tmp_path / "job.toml", job_dict(cohort_manifest, runtime={"workers": 1}, anomaly={"enabled": False}))
    db = tmp_path / "driver.duckdb"
    args = ["run", str(job), "--db", str(db), "--run-id", "drv", "--address", cluster.address, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and _done(db, "drv") < 2 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)  # the driver only: the cluster is not its child
    proc.wait()
    done_before = _done(db, "drv")
    assert 2 <= done_before < cohort.height
    assert cli_main(args) == 0
    out = "".join(capsys.readouterr())
    assert f"{done_before} of {cohort.height} patients already done" in out
    assert_same_importances(_stored(db, "drv"), reference_rows)
