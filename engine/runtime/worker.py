"""The Ray actor: one per GPU (or per CPU slot), holding the model for the whole run.

The actor is threaded (two calls at a time): while one call computes on the device under a
lock, the next call reads and preprocesses its volume, so I/O overlaps compute. ``process`` is a
streaming generator: it first reports the phase it enters (``loading``, ``loaded``,
``computing``), then the outcome, so the driver can time each patient's phase (a patient stuck
past ``patient_timeout_s`` is killed and charged) and measure re-queue latency. Which patient a
death is charged to does not rest on these markers, which a dying process may not have
delivered (see :mod:`engine.runtime.dispatch`). ``ping`` runs in its own
concurrency group, so an actor busy with two patients still answers it. The constructor is
light (no engine import): an actor answers ``ping`` as soon as Ray has placed it, and loads the
model in ``setup``, so the driver can tell "not placed" from "placed and loading". Only small
records (phase markers, ``PatientResult`` rows or a ``Failure``) travel back to the driver.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray


#: Phases in which a patient runs its own code on an actor; one that stays in them past
#: ``patient_timeout_s`` is stuck.
EXECUTING = ("loading", "computing")


class PatientWorker:
    """Plain class; :func:`remote_worker_class` turns it into a Ray actor class."""

    def __init__(self, spec: dict[str, Any], base_dir: str, threads: int, index: int) -> None:
        self._args = (spec, base_dir)
        self.threads, self.index = max(1, threads), index
        self.name = f"worker-{index}@{socket.gethostname()}:{os.getpid()}"
        self.processor: Any = None
        self.heap: Any = None  # the HeapTuning of this process (setup)
        self._device_lock = threading.Lock()

    def setup(self) -> dict[str, Any]:
        """Load the model (once per actor) and say where the actor runs."""
        import torch

        from engine.jobs import JobSpec
        from engine.pipeline import PatientProcessor
        from engine.runtime.heap import keep_cpu_heap

        spec, base_dir = self._args
        job = JobSpec.from_dict(spec, base_dir=base_dir)
        # window-sized buffers reused, not faulted in afresh (engine.runtime.heap), before the model
        # allocates; the job's [runtime] cpu_heap where it names one, else this node's AGG2EXP_CPU_HEAP
        self.heap = keep_cpu_heap(job.runtime.cpu_heap)
        # Exactly the CPUs the actor reserved: intra-op threads for compute (Ray already sets
        # OMP_NUM_THREADS to the reservation).
        torch.set_num_threads(self.threads)
        self.processor = PatientProcessor(job, worker_name=self.name)
        return self.info()

    @ray.method(concurrency_group="health")
    def ping(self) -> dict[str, Any]:
        """Where the actor runs and what Ray gave it (cheap: no torch, answers while computing)."""
        rc = ray.get_runtime_context()
        return {
            "worker": self.name, "index": self.index, "pid": os.getpid(),
            "node_id": rc.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "assigned_resources": rc.get_assigned_resources(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def info(self) -> dict[str, Any]:
        """:meth:`ping` plus the device the model is on and the threads torch uses."""
        import torch

        dev = self.processor.device
        out = self.ping() | {"device": str(dev), "torch_threads": torch.get_num_threads(),
                             "cpu_heap": self.heap.reason if self.heap is not None else None}
        if dev.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name(dev)
        return out

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        """Phase markers ``(phase, wall time)``, then the patient's ``Outcome``."""
        from engine.pipeline import failure_of

        pid = str(record.get("patient_id"))
        yield ("loading", time.time())
        try:
            t0 = time.perf_counter()
            case = self.processor.load(record)
            loaded = time.perf_counter()
            yield ("loaded", time.time())
            with self._device_lock:
                waited = time.perf_counter() - loaded
                yield ("computing", time.time())
                outcome = self.processor.compute(
                    case, timings={"load": round(loaded - t0, 4), "queue_wait": round(waited, 4)}
                )
        except Exception as exc:  # noqa: BLE001 - recorded against the patient, the run goes on
            outcome = failure_of(pid, exc, self.name)
        yield outcome


def remote_worker_class() -> Any:
    """The Ray actor class: two patient calls at a time plus a health group; never restarted by
    Ray (the driver replaces lost actors itself, wherever resources are) and no task retries
    (the driver decides what a lost patient costs)."""
    return ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2,
                      concurrency_groups={"health": 1})(PatientWorker)
