"""Dispatch of patients to a changing pool of actors, and the writer that commits their results.

Two parts that never wait on each other:

- :class:`Scheduler` (the driver's main thread) keeps a pool of actors sized to what the cluster
  offers now (one per GPU, else per CPU slot, up to ``[runtime] workers``): nodes that join get
  actors, actors on lost nodes are replaced when resources return. It feeds each actor at most
  ``in_flight`` patients and reacts to events with ``ray.wait``: phase markers and outcomes from
  the actors' streaming ``process`` calls, actors becoming ready, health pings.
- :class:`ResultWriter` (a thread) commits each outcome in its own transaction and reports
  progress, so a slow write never holds up dispatch.

What a lost actor costs its patients. The driver's view of an actor is always a little behind:
a phase marker, an outcome, or the start of the next patient may not have reached it when the
process dies. So a death is charged only when it is unambiguous, with exactly one patient on the
actor (sent and not finished, whatever phase was last heard): that patient is charged an
attempt. With more than one, nobody is charged and all of them become suspects, each re-run
alone on an otherwise idle actor, where a death is unambiguous. If its node died (or the
connection to it broke) nobody is charged and its patients go back to the queue at their place.
A patient the driver killed for running past ``patient_timeout_s`` is charged (its own clock says
it is the one). A patient charged ``max_attempts`` times is marked failed with that reason.

The run stops by itself (:attr:`Scheduler.stopped` says why) when no actor has been serving for
``worker_timeout_s`` while work remains, or at once when a run that started its own local Ray
loses its only node: what is done stays done, the rest stays pending, and rerunning resumes.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from engine.pipeline import Failure, Outcome
from engine.runtime.cluster import NodeView, RayContext, alive_nodes
from engine.runtime.progress import Progress
from engine.runtime.worker import EXECUTING
from engine.store import PatientResult, Store

log = logging.getLogger("engine.runtime")

#: How often the cluster watcher re-reads the alive nodes (joining and lost nodes), seconds.
CLUSTER_CHECK_S = 2.0
#: Longest ``ray.wait`` when nothing happens; bounds how late timeouts and node changes are seen.
TICK_S = 1.0
#: Consecutive actor start-up failures (the constructor raised) after which the run stops.
MAX_START_FAILURES = 3


def _utc(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class _Entry:
    """A patient on its way: its place in the cohort, what it has cost, where it is now."""

    order: int
    record: dict[str, Any]
    attempts: int = 0  # charged: its actor's process died while it alone was executing
    losses: int = 0  # uncharged losses while executing (node or connection lost, ambiguous deaths)
    suspect: bool = False  # run alone until it finishes
    phase: str | None = None
    phase_at: float = 0.0  # monotonic time the current phase began (as the driver heard it)
    lost_at: float | None = None  # wall time its actor was lost, for the re-queue latency

    @property
    def pid(self) -> str:
        return str(self.record["patient_id"])

    def __lt__(self, other: _Entry) -> bool:
        return self.order < other.order


@dataclass
class _Actor:
    index: int
    handle: Any
    ready_ref: Any  # the first ping (answers once Ray has placed the actor), then ``setup``
    created_at: float
    state: str = "starting"  # starting (not placed yet), loading (placed, loading the model), ready, gone
    info: dict[str, Any] = field(default_factory=dict)
    placed_at: float | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    stop_reason: str | None = None
    inflight: dict[Any, _Entry] = field(default_factory=dict)  # streaming generator -> patient
    last_heard: float = 0.0  # monotonic
    ping_ref: Any = None
    done: int = 0

    @property
    def running_suspect(self) -> bool:
        return any(e.suspect for e in self.inflight.values())

    def record(self) -> dict[str, Any]:
        keys = ("worker", "pid", "node_id", "node_ip", "device", "gpu_ids", "cuda_visible_devices",
                "torch_threads", "cpu_heap", "assigned_resources")
        return {"index": self.index, **{k: self.info.get(k) for k in keys},
                "requested_at": _utc(self.created_at), "started_at": _utc(self.placed_at),
                "ready_at": _utc(self.ready_at),
                "stopped_at": _utc(self.stopped_at), "stop_reason": self.stop_reason, "patients_done": self.done}


class ResultWriter:
    """The one writer: commits outcomes in arrival order on its own thread.

    The store connection is used only by this thread while it runs; :meth:`close` drains what
    was submitted (nothing computed is dropped) before the caller touches the store again.
    ``on_result(patient_id, status)`` runs on the caller's thread, from :meth:`run_callbacks`,
    after the patient is committed (callbacks may need the main thread, e.g. to start Ray nodes).
    """

    def __init__(self, store: Store, run_id: str, bar: Progress,
                 on_result: Callable[[str, str], None] | None = None) -> None:
        self.store, self.run_id, self.bar, self.on_result = store, run_id, bar, on_result
        self.seconds = 0.0
        self.max_backlog = 0
        self.stage_times: dict[str, list[float]] = collections.defaultdict(list)
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue[tuple[str, Outcome] | None] = queue.SimpleQueue()
        self._committed: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="agg2exp-writer", daemon=True)
        self._thread.start()

    def submit(self, pid: str, outcome: Outcome) -> None:
        self._queue.put((pid, outcome))
        self.max_backlog = max(self.max_backlog, self._queue.qsize())

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the scheduler's thread
                    self.error = exc

    def _write(self, pid: str, outcome: Outcome) -> None:
        t0 = time.perf_counter()
        if isinstance(outcome, PatientResult):
            self.store.write_patient(self.run_id, outcome)
            for k, v in (outcome.timings or {}).items():
                self.stage_times[k].append(float(v))
            status, error = "done", None
        else:
            self.store.mark_failed(self.run_id, pid, error=outcome.error, traceback=outcome.traceback,
                                   worker=outcome.worker)
            status, error = "failed", outcome.error
        self.seconds += time.perf_counter() - t0
        self.bar.update(status, pid=pid, error=error)
        if self.on_result is not None:
            self._committed.put((pid, status))

    def run_callbacks(self) -> None:
        while self.on_result is not None and not self._committed.empty():
            self.on_result(*self._committed.get())

    def timings(self) -> dict[str, dict[str, float]]:
        return {k: {"total": round(sum(v), 3), "median": round(sorted(v)[len(v) // 2], 4)}
                for k, v in self.stage_times.items()}


class ClusterWatch:
    """Reads the cluster's alive nodes every CLUSTER_CHECK_S on its own thread, so that the GCS
    round trip never sits in the dispatch loop; ``nodes`` is the latest view."""

    def __init__(self, reserve: dict[str, float]) -> None:
        self.reserve = reserve
        self.nodes: list[NodeView] = alive_nodes(reserve)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agg2exp-cluster-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(CLUSTER_CHECK_S):
            try:
                self.nodes = alive_nodes(self.reserve)
            except Exception as exc:  # noqa: BLE001 - keep the last view; the GCS may be restarting
                log.debug("could not read the cluster's nodes: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Scheduler:
    """Feeds patients to a pool of actors that follows the cluster; see the module docstring."""

    def __init__(
        self, *, ctx: RayContext, actor_cls: Any, actor_args: tuple[Any, ...], reserve: dict[str, float],
        records: list[Mapping[str, Any]], writer: ResultWriter, bar: Progress, in_flight: int,
        max_attempts: int, max_workers: int | None, worker_timeout_s: float,
        patient_timeout_s: float = 3600.0,
    ) -> None:
        self.ctx, self.actor_cls, self.actor_args, self.reserve = ctx, actor_cls, actor_args, reserve
        self.writer, self.bar = writer, bar
        self.in_flight, self.max_attempts = in_flight, max_attempts
        self.max_workers, self.timeout = max_workers, worker_timeout_s
        self.ping_every = min(30.0, worker_timeout_s / 4)
        self.patient_timeout = patient_timeout_s
        self.queue: list[_Entry] = [_Entry(i, dict(r)) for i, r in enumerate(records)]  # a heap by order
        self.suspects: list[_Entry] = []
        self.actors: list[_Actor] = []
        self._gens: dict[Any, _Actor] = {}
        self._ready_refs: dict[Any, _Actor] = {}
        self._pings: dict[Any, _Actor] = {}
        self._indices = itertools.count()
        self.watch = ClusterWatch(reserve)
        self._seen_slots = False
        self._no_service_since = time.monotonic()
        self._start_failures = 0
        self._last_start_error = ""
        self.stopped: str | None = None
        self.requeued = 0
        self.charged = 0
        self.requeue_latencies: list[dict[str, Any]] = []
        self.max_gap_s = 0.0  # longest the loop was busy between two waits, once dispatch started
        self._dispatched = False
        self.t_first_ready: float | None = None
        self._idle = threading.Event()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        import ray

        while self._work_left() and self.stopped is None:
            self.writer.run_callbacks()  # tests' hooks; not part of the dispatch gap
            t_busy = time.perf_counter()
            self.writer.raise_error()
            now = time.monotonic()
            self._follow_cluster(now)
            self._check_health(now)
            self._check_stop(now)
            if self.stopped is not None:
                break
            self._dispatch()
            self.bar.set_in_flight(sum(len(a.inflight) for a in self.actors))
            refs = [*self._gens, *self._ready_refs, *self._pings]
            self._gap(t_busy)
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=TICK_S)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            else:
                # No actor requested and nothing in flight (the pool is empty until the next
                # cluster check): there is no Ray event to wait on, so block for one tick.
                self._idle.wait(TICK_S)
                ready = []
            t_busy = time.perf_counter()
            for ref in ready:
                self._handle(ref)
            self._gap(t_busy)

    def _gap(self, t_busy: float) -> None:
        # Start-up (exporting the actor class, first placements) is not dispatch; count from the
        # first patient sent.
        if self._dispatched:
            self.max_gap_s = max(self.max_gap_s, time.perf_counter() - t_busy)

    def _work_left(self) -> bool:
        return bool(self.queue or self.suspects or any(a.inflight for a in self.actors))

    @property
    def nodes(self) -> list[NodeView]:
        return self.watch.nodes

    def shutdown(self) -> None:
        """Kill every actor of the run (also pending ones), recording when they stopped."""
        self.watch.close()
        for a in self.actors:
            if a.state != "gone":
                self._retire(a, "run finished" if self.stopped is None else "run stopped")

    # -- the pool ---------------------------------------------------------------------------
    def _follow_cluster(self, now: float) -> None:
        if self._slots():
            self._seen_slots = True
        live = [a for a in self.actors if a.state != "gone"]
        work = len(self.queue) + len(self.suspects) + sum(len(a.inflight) for a in live)
        target = min(max(1, self._slots()), self.max_workers or 10**9, work) if work else 0
        for _ in range(target - len(live)):
            self._start_actor()
        # Actors not placed yet beyond the target (nodes left, or work is running out) are withdrawn.
        excess = len(live) - target
        for a in sorted((a for a in live if a.state == "starting"), key=lambda a: -a.created_at):
            if excess <= 0:
                break
            self._retire(a, "not needed")
            excess -= 1

    def _slots(self) -> int:
        return sum(n.slots for n in self.nodes)

    def _start_actor(self) -> None:
        i = next(self._indices)
        handle = self.actor_cls.options(**self.reserve).remote(*self.actor_args, i)
        actor = _Actor(i, handle, handle.ping.remote(), time.time())
        self.actors.append(actor)
        self._ready_refs[actor.ready_ref] = actor

    def _retire(self, a: _Actor, reason: str) -> None:
        import ray

        a.state, a.stopped_at, a.stop_reason = "gone", time.time(), reason
        self._ready_refs.pop(a.ready_ref, None)
        if a.ping_ref is not None:
            self._pings.pop(a.ping_ref, None)
        try:
            ray.kill(a.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass

    def _serving(self) -> int:
        """Actors placed and answering (loading the model counts: that is work, not a hang)."""
        return sum(a.state in ("loading", "ready") for a in self.actors)

    # -- stopping ---------------------------------------------------------------------------
    def _check_stop(self, now: float) -> None:
        if self._serving():
            self._no_service_since = now
            return
        remaining = len(self.queue) + len(self.suspects)
        if self.ctx.started and self._seen_slots and not self._slots():
            self.stopped = "the local Ray node was lost (its raylet died); no worker can be placed"
        elif self._start_failures >= MAX_START_FAILURES:
            self.stopped = f"workers failed to start {self._start_failures} times in a row: {self._last_start_error}"
        elif now - self._no_service_since >= self.timeout:
            lost = sorted({a.info.get("node_ip", "?") + " " + str(a.info.get("node_id", "?"))[:8]
                           for a in self.actors if a.stop_reason and "lost" in a.stop_reason})
            why = (f"no worker could be placed or answered for {self.timeout:.0f} s "
                   f"(cluster: {len(self.nodes)} alive node(s) with room for {self._slots()} worker(s)")
            why += f"; lost: {', '.join(lost)})" if lost else ")"
            self.stopped = why
        if self.stopped:
            log.warning("run stopping: %s; %d patients not computed", self.stopped, remaining)

    # -- health -----------------------------------------------------------------------------
    def _check_health(self, now: float) -> None:
        for a in self.actors:
            if not (a.state == "loading" or (a.state == "ready" and a.inflight)):
                continue
            # A patient stuck in its own code (a decoder that never returns, a hung device call):
            # the actor still answers pings, so only the patient's own clock shows it.
            stuck = [e for e in a.inflight.values() if e.phase in EXECUTING and now - e.phase_at >= self.patient_timeout]
            if stuck:
                self._lost(a, None, f"killed: patient {stuck[0].pid} was {stuck[0].phase} for more than "
                                    f"{self.patient_timeout:.0f} s ([runtime] patient_timeout_s)", timed_out=stuck)
                continue
            silent = now - a.last_heard
            if silent >= self.timeout:
                self._lost(a, None, f"lost: did not answer for {silent:.0f} s")
            elif silent >= self.ping_every and a.ping_ref is None:
                a.ping_ref = a.handle.ping.remote()
                self._pings[a.ping_ref] = a

    # -- dispatch ---------------------------------------------------------------------------
    def _dispatch(self) -> None:
        ready = [a for a in self.actors if a.state == "ready"]
        if not ready:
            return
        drain: set[int] = set()
        if self.suspects:
            idle = [a for a in ready if not a.inflight]
            for a in idle:
                if not self.suspects:
                    break
                self._send(a, heapq.heappop(self.suspects))
            # Let as many of the least loaded actors run dry as there are suspects left, so that
            # each suspect soon runs alone (after a node loss there may be many).
            candidates = sorted((a for a in ready if not a.running_suspect), key=lambda a: len(a.inflight))
            drain = {a.index for a in candidates[:len(self.suspects)]}
        for a in sorted(ready, key=lambda a: len(a.inflight)):
            if a.index in drain or a.running_suspect:
                continue
            while self.queue and len(a.inflight) < self.in_flight:
                self._send(a, heapq.heappop(self.queue))

    def _send(self, a: _Actor, entry: _Entry) -> None:
        gen = a.handle.process.remote(entry.record)
        self._dispatched = True
        entry.phase = "queued"
        a.inflight[gen] = entry
        self._gens[gen] = a

    # -- events -----------------------------------------------------------------------------
    def _handle(self, ref: Any) -> None:
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        if ref in self._ready_refs:
            a = self._ready_refs.pop(ref)
            try:
                info = ray.get(ref)
            except RayActorError as exc:
                self._start_failed(a, exc)
                return
            except Exception as exc:  # noqa: BLE001 - setup raised (model or device unusable there)
                self._start_failed(a, exc)
                return
            a.last_heard = time.monotonic()
            if a.state == "starting":  # placed: now load the model
                a.state, a.placed_at, a.info = "loading", time.time(), info
                a.ready_ref = a.handle.setup.remote()
                self._ready_refs[a.ready_ref] = a
                return
            a.info = info
            a.state, a.ready_at = "ready", time.time()
            self._start_failures = 0
            self.t_first_ready = self.t_first_ready or time.perf_counter()
            log.info("worker %d ready on node %s (%s)", a.index, a.info.get("node_ip"), a.info.get("device"))
            return
        if ref in self._pings:
            a = self._pings.pop(ref)
            a.ping_ref = None
            try:
                ray.get(ref)
                a.last_heard = time.monotonic()
            except RayActorError as exc:
                self._lost(a, exc, "lost")
            return
        a = self._gens.get(ref)
        if a is None:
            return
        entry = a.inflight[ref]
        try:
            value = ray.get(next(ref))
        except StopIteration:
            value = Failure(entry.pid, "the worker returned no result for this patient", None, a.info.get("worker"))
        except RayActorError as exc:
            self._lost(a, exc, "lost")
            return
        except ObjectLostError as exc:
            # The outcome was computed but lived in the object store of a node that is gone:
            # that is a lost node, not the patient's failure. Re-run it (and the actor's others).
            self._lost(a, exc, "lost its result object")
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be deserialised
            value = Failure(entry.pid, f"could not receive the result: {type(exc).__name__}: {str(exc)[:300]}",
                            str(exc)[-4000:], a.info.get("worker"))
        a.last_heard = time.monotonic()
        if isinstance(value, tuple):
            entry.phase, entry.phase_at = value[0], time.monotonic()
            if value[0] == "loading" and entry.lost_at is not None:
                self.requeue_latencies.append({"patient_id": entry.pid, "lost_at": entry.lost_at,
                                               "restarted_at": value[1], "actor": a.index})
                entry.lost_at = None
            return
        del a.inflight[ref], self._gens[ref]
        a.done += 1
        self.writer.submit(entry.pid, value)

    def _start_failed(self, a: _Actor, exc: Exception) -> None:
        """Starting an actor failed: its node was lost (nothing to count), or the actor itself
        failed (constructor or ``setup`` raised, or its process died while loading the model);
        the latter are counted, and the run stops after MAX_START_FAILURES in a row."""
        from ray.exceptions import ActorDiedError, RayActorError

        msg = _last_line(exc)
        node_lost = isinstance(exc, RayActorError) and not (
            isinstance(exc, ActorDiedError) and (exc.actor_init_failed or "node has died" not in str(exc))
        )
        if node_lost:
            self._lost(a, exc, "lost while starting")
            return
        self._retire(a, f"failed to start: {msg}")
        self._start_failures += 1
        self._last_start_error = msg
        log.warning("worker %d failed to start: %s", a.index, msg)

    def _lost(self, a: _Actor, exc: Exception | None, reason: str, *, timed_out: list[_Entry] | None = None) -> None:
        """An actor is gone: re-queue its patients at once and charge only an unambiguous culprit.

        ``timed_out``: the driver kills the actor because these patients ran past
        ``patient_timeout_s``; that charges them (their own clock implicates them), not the others.
        Otherwise the phases the driver heard may be stale (see the module docstring): a process
        death is charged only to a patient that was alone on the actor.
        """
        from ray.exceptions import ActorDiedError

        if a.state == "gone":
            return
        process_died = timed_out is not None or (
            isinstance(exc, ActorDiedError) and "node has died" not in str(exc) and not exc.preempted)
        if exc is not None:
            reason = f"{reason}: {'worker process died' if process_died else 'node or connection lost'}"
        self._retire(a, reason)
        entries = sorted(a.inflight.values())
        for gen in a.inflight:
            self._gens.pop(gen, None)
        a.inflight.clear()
        if timed_out is not None:  # several stuck at once: ambiguous, like a death with several on it
            culprits = timed_out if len(timed_out) == 1 else []
            lost = [e for e in timed_out if e not in culprits]
        elif process_died:
            culprits = entries if len(entries) == 1 else []
            lost = entries if len(entries) > 1 else []
        else:  # node or connection lost: nobody is charged, but a volume that keeps killing nodes must end
            culprits, lost = [], entries
        now = time.time()
        log.warning("worker %d %s; re-queueing %d patient(s)", a.index, reason, len(entries))
        for e in entries:
            e.phase, e.lost_at = None, now
            self.requeued += 1
            if e in culprits:
                e.attempts += 1
                self.charged += 1
                if e.attempts >= self.max_attempts:
                    why = (f"it ran longer than [runtime] patient_timeout_s = {self.patient_timeout:.0f} s "
                           f"{e.attempts} times (alone on the worker, which was killed each time); check the "
                           "volume, or raise patient_timeout_s if such a patient needs longer"
                           if timed_out is not None else
                           f"its worker process died {e.attempts} times while processing this patient "
                           f"(alone on the worker); check memory and the volume ({_last_line(exc)})")
                    self.writer.submit(e.pid, Failure(e.pid, why, str(exc)[-4000:] if exc else None,
                                                      a.info.get("worker")))
                    continue
                e.suspect = True  # until it finishes, it runs alone
            elif e in lost:
                e.losses += 1
                if e.losses >= 2 * self.max_attempts + 1:
                    self.writer.submit(e.pid, Failure(
                        e.pid, f"its worker was lost {e.losses} times while processing this patient",
                        str(exc)[-4000:] if exc else None, a.info.get("worker")))
                    continue
                e.suspect = e.suspect or process_died  # an ambiguous death: find the culprit alone
            heapq.heappush(self.suspects if e.suspect else self.queue, e)

    # -- the report -------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return {
            "actors": [a.record() for a in self.actors],
            "requeued_after_worker_loss": self.requeued,
            "attempts_charged": self.charged,
            "requeue_latency_s": [round(r["restarted_at"] - r["lost_at"], 3) for r in self.requeue_latencies],
            "requeues": self.requeue_latencies,
            "dispatch_max_gap_ms": round(self.max_gap_s * 1000, 2),
            "stopped": self.stopped,
        }


def _last_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("class_name", "actor_id", "pid:", "namespace", "ip:")):
            return ln[:300]
    return type(exc).__name__
