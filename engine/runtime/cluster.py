"""Starting or joining Ray: a local instance bound to loopback, or an existing cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class RayContext:
    """The Ray session a run uses; ``started`` says whether this run owns (and stops) it."""

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


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> RayContext:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray that listens on loopback only.

    On Linux Ray binds its services to the node's network address by default; a local run sets
    Ray's single-machine mode first, so that the GCS, raylet and workers listen on 127.0.0.1.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ[_LOOPBACK_ENV] = "0"
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return RayContext(False, ray.get_runtime_context().gcs_address, dict(ray.cluster_resources()), owned=False)
    common: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": "ERROR" if quiet else "INFO"}
    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the env was set
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            runtime_env={"env_vars": {_LOOPBACK_ENV: "0"}},
            **common,
        )
        started = True
    else:
        ray.init(address=address, **common)
        started = False
    return RayContext(started, ray.get_runtime_context().gcs_address, dict(ray.cluster_resources()))


def disconnect(ctx: RayContext) -> None:
    """Stop the local instance this run started, or disconnect from a joined cluster (which keeps
    running); a Ray session the caller initialised is left alone."""
    import ray

    if ctx.owned and ray.is_initialized():
        ray.shutdown()
