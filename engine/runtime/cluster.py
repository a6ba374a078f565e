"""Starting or joining Ray, and reading what the cluster offers: a local instance bound to
loopback, or an existing cluster; alive nodes and how many actors each can host."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class RayContext:
    """The Ray session a run uses; ``started`` says whether this run started it (a local Ray)."""

    started: bool
    address: str
    resources: dict[str, float]
    owned: bool = True  # False when Ray was already initialised by the caller

    @property
    def n_gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def n_cpus(self) -> int:
        return int(self.resources.get("CPU", 0))


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in _LOOPBACK_HOSTS


def _use_loopback() -> None:
    """Ray's single-machine mode: services on 127.0.0.1, and a 127.0.0.1 address is not rewritten
    to the machine's network address (which a head started with --node-ip-address 127.0.0.1 does
    not listen on)."""
    os.environ[_LOOPBACK_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the env was set


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True,
            timeout_s: float = 120.0) -> RayContext:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray that listens on loopback only.

    On Linux Ray binds its services to the node's network address by default; a local run (or an
    address on 127.0.0.1) sets Ray's single-machine mode first. Joining gives up after
    ``timeout_s`` with a one-line error instead of retrying for ever.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or _is_loopback(address):
        _use_loopback()
    import ray

    if ray.is_initialized():
        return RayContext(False, ray.get_runtime_context().gcs_address, dict(ray.cluster_resources()), owned=False)
    common: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": "ERROR" if quiet else "INFO"}
    if address is None:
        ray.init(
            # "local": always a new instance; without it ray.init joins any Ray already running on
            # the machine (found through /tmp/ray/ray_current_cluster and the GCS processes).
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            runtime_env={"env_vars": {_LOOPBACK_ENV: "0"}},
            **common,
        )
        started = True
    else:
        _init_within(timeout_s, address=address, **common)
        started = False
    return RayContext(started, ray.get_runtime_context().gcs_address, dict(ray.cluster_resources()))


def _init_within(timeout_s: float, **kwargs: Any) -> None:
    """``ray.init`` retries an unreachable address for minutes; bound it."""
    import ray

    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    t = threading.Thread(target=init, name="agg2exp-ray-init", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise UserError(f"could not reach the Ray cluster at {kwargs['address']} within {timeout_s:.0f} s; "
                        "check the address (`ray status --address ...`) or raise [runtime] worker_timeout_s")
    if failure:
        exc = failure[0]
        if isinstance(exc, ConnectionError | ValueError):
            raise UserError(f"could not join the Ray cluster at {kwargs['address']}: {str(exc).splitlines()[0]}") from exc
        raise exc


def disconnect(ctx: RayContext) -> None:
    """Stop the local instance this run started, or disconnect from a joined cluster (which keeps
    running); a Ray session the caller initialised is left alone."""
    import ray

    if ctx.owned and ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class NodeView:
    """One alive node and how many actors of the run's shape it can host."""

    node_id: str
    ip: str
    slots: int


def actor_slots(resources: dict[str, float], reserve: dict[str, float]) -> int:
    """How many actors reserving ``reserve`` (``num_cpus``, ``num_gpus``) fit in ``resources``."""
    fits = []
    for key, ray_key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        need = reserve.get(key, 0)
        if need:
            fits.append(int(resources.get(ray_key, 0.0) / need + 1e-9))
    return min(fits) if fits else 0


def alive_nodes(reserve: dict[str, float]) -> list[NodeView]:
    """The cluster's alive nodes, as the GCS sees them now."""
    import ray

    return [
        NodeView(n["NodeID"], n.get("NodeManagerAddress", "?"), actor_slots(n.get("Resources", {}), reserve))
        for n in ray.nodes() if n.get("Alive")
    ]
