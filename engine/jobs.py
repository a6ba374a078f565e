"""Job specifications (``jobs/*.toml``): parsing and validation with errors that say what to fix.

A job names a cohort (a manifest, or a phantom cohort to generate), a model, preprocessing, the
attribution settings, RoIs, the runtime and the analytics to run after. Every section is a frozen
dataclass; unknown keys and wrong types stop the job before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.errors import JobSpecError, check_keys


def read_job_file(path: str | Path, *, example: str = "jobs/demo.toml") -> dict[str, Any]:
    """The TOML tables of a job file, with clear errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise JobSpecError(f"job spec {p} does not exist; see {example} for an example")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(f"{p} is not valid TOML: {exc}") from None


def _check_keys(section: str, data: Mapping[str, Any], cls: type) -> None:
    check_keys(f"[{section}]", data, (f.name for f in fields(cls)))


def _typed(section: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind in (int, float):
        raise JobSpecError(f"[{section}] {key} must be a number, got {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise JobSpecError(f"[{section}] {key} must be {names}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class CohortSpec:
    """Where patients come from: a manifest file, or a phantom cohort generated on the fly."""

    manifest: str | None = None
    phantoms: int | None = None  # number of phantom patients to generate
    seed: int = 0
    anomaly_fraction: float = 0.125
    out_dir: str = "agg2exp_out/phantoms"
    limit: int | None = None  # only the first N patients (for trying a job)

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.phantoms is None):
            raise JobSpecError("[cohort] needs exactly one of `manifest = \"path.csv\"` or `phantoms = N`")
        if self.phantoms is not None and self.phantoms < 1:
            raise JobSpecError(f"[cohort] phantoms must be at least 1, got {self.phantoms}")
        if not 0.0 <= self.anomaly_fraction <= 1.0:
            raise JobSpecError(f"[cohort] anomaly_fraction must be in [0, 1], got {self.anomaly_fraction}")


@dataclass(frozen=True, kw_only=True)
class AttributionSpec:
    """Attribution method and its options (names as in ``engine.explain_volume``)."""

    method: str = "smoothgrad"
    n_samples: int = 20
    sigma: float = 0.1
    steps: int = 20
    baseline: str | float = "zeros"
    target: str = "sum"
    targets: tuple[str, ...] | None = None
    overlap: float = 0.25
    blend: str = "constant"
    window_batch: int = 1
    class_chunk: int | None = None
    vjp: str = "auto"
    autocast: str | None = None  # "bf16" or "fp16" on GPUs
    seed: int = 0
    save_maps: tuple[str, ...] = ()  # patient ids whose maps are written as NIfTI (source grid and affine)
    maps_dir: str = "agg2exp_out/maps"  # where, relative to the job file; one folder per patient
    features: str = "segments"  # kernel_shap / occlusion: "segments" or "cubes"
    cube_size: int = 8  # voxels per cube side when features = "cubes"
    perturbation_baseline: str | float = "min"  # value removed features are set to

    def __post_init__(self) -> None:
        from engine.attribution.gradients import GRADIENT_METHODS
        from engine.attribution.targets import TARGET_KINDS, resolve_target_kind

        if self.method not in GRADIENT_METHODS and self.method not in ("kernel_shap", "occlusion"):
            raise JobSpecError(
                f"[attribution] unknown method {self.method!r}; choose one of "
                f"{sorted(set(GRADIENT_METHODS) | {'kernel_shap', 'occlusion'})}"
            )
        try:
            resolve_target_kind(self.target)
        except ValueError:
            raise JobSpecError(f"[attribution] target must be one of {TARGET_KINDS}, got {self.target!r}") from None
        if self.blend not in ("constant", "gaussian"):
            raise JobSpecError(f"[attribution] blend must be 'constant' or 'gaussian', got {self.blend!r}")
        if not 0 <= self.overlap < 1:
            raise JobSpecError(f"[attribution] overlap must be in [0, 1), got {self.overlap}")
        if self.n_samples < 1 or self.steps < 1 or self.window_batch < 1:
            raise JobSpecError("[attribution] n_samples, steps and window_batch must be at least 1")
        if self.autocast not in (None, "bf16", "fp16"):
            raise JobSpecError(f"[attribution] autocast must be 'bf16' or 'fp16' (or absent), got {self.autocast!r}")
        if self.features not in ("segments", "cubes") or self.cube_size < 1:
            raise JobSpecError("[attribution] features must be 'segments' or 'cubes' and cube_size at least 1")
        if self.vjp not in ("auto", "loop", "batched"):
            raise JobSpecError(f"[attribution] vjp must be 'auto', 'loop' or 'batched', got {self.vjp!r}")

    def method_options(self) -> dict[str, Any]:
        """Options of the chosen method only, as ``explain_volume`` takes them."""
        if self.method == "smoothgrad":
            return {"n_samples": self.n_samples, "sigma": self.sigma}
        if self.method in ("integrated_gradients", "ig"):
            return {"steps": self.steps, "baseline": self.baseline}
        if self.method in ("kernel_shap", "occlusion"):
            options: dict[str, Any] = {"features": self.features, "cube_size": self.cube_size,
                                       "baseline": None if self.perturbation_baseline == "min" else self.perturbation_baseline}
            if self.method == "kernel_shap":
                options["n_samples"] = self.n_samples
            return options
        return {}


@dataclass(frozen=True, kw_only=True)
class RuntimeSpec:
    """How the cohort is spread: Ray actors, GPUs per actor, patients in flight."""

    workers: int | None = None  # at most this many actors; default: one per GPU, else per CPU slot
    gpus_per_worker: float = 1.0
    in_flight: int = 2  # patients queued per actor (backpressure)
    threads_per_worker: int = 1
    address: str | None = None  # Ray cluster address; None starts a local instance
    max_attempts: int = 3  # a patient whose worker dies this many times is marked failed
    device: str = "auto"  # auto, cpu, cuda
    worker_timeout_s: float = 120.0  # no worker placed or answering this long: the run stops (exit 3)

    def __post_init__(self) -> None:
        if not self.worker_timeout_s > 0:
            raise JobSpecError(f"[runtime] worker_timeout_s must be positive, got {self.worker_timeout_s}")
        if self.workers is not None and self.workers < 1:
            raise JobSpecError(f"[runtime] workers must be at least 1, got {self.workers}")
        if not 0 < self.gpus_per_worker <= 8:
            raise JobSpecError(f"[runtime] gpus_per_worker must be in (0, 8], got {self.gpus_per_worker}")
        if self.in_flight < 1 or self.threads_per_worker < 1 or self.max_attempts < 1:
            raise JobSpecError("[runtime] in_flight, threads_per_worker and max_attempts must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise JobSpecError(f"[runtime] device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class AnomalySpec:
    """Isolation-forest scoring after the run (per target class, on mass vectors)."""

    enabled: bool = True
    seed: int = 0
    n_estimators: int = 100
    reference_run: str | None = None


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole job; ``JobSpec.load(path)`` or ``JobSpec.from_dict(data)``."""

    name: str
    run_id: str | None = None
    cohort: CohortSpec
    model: Mapping[str, Any]
    preprocess: Mapping[str, Any] = field(default_factory=dict)  # engine.io.PreprocessSpec
    attribution: AttributionSpec = field(default_factory=AttributionSpec)
    rois: Mapping[str, Any] = field(default_factory=dict)  # engine.io.RoISpec
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    anomaly: AnomalySpec = field(default_factory=AnomalySpec)
    report: bool = True
    base_dir: str = "."

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        p = Path(path)
        return cls.from_dict(read_job_file(p), base_dir=p.parent.resolve())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | Path = ".") -> JobSpec:
        known = {"job", "cohort", "model", "preprocess", "attribution", "rois", "runtime", "anomaly"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobSpecError(f"unknown section(s) {unknown}; sections are {sorted(known)}")
        job = dict(data.get("job", {}))
        _check_keys("job", job, _JobSection)
        if "name" not in job:
            raise JobSpecError("[job] needs a name, e.g. name = \"my-cohort\"")
        if "cohort" not in data:
            raise JobSpecError("the job needs a [cohort] section with `manifest` or `phantoms`")
        if "model" not in data:
            raise JobSpecError("the job needs a [model] section (kind = \"demo\" for the shipped model)")
        sections: dict[str, Any] = {}
        for key, spec_cls in (("cohort", CohortSpec), ("attribution", AttributionSpec), ("runtime", RuntimeSpec),
                              ("anomaly", AnomalySpec)):
            raw = dict(data.get(key, {}))
            _check_keys(key, raw, spec_cls)
            for f in fields(spec_cls):
                if f.name in raw and isinstance(raw[f.name], list):
                    raw[f.name] = tuple(raw[f.name])
            try:
                sections[key] = spec_cls(**raw)
            except TypeError as exc:
                raise JobSpecError(f"[{key}] {exc}") from None
        _validate_sections(data, base_dir)
        return cls(
            name=_typed("job", "name", job["name"], str),
            run_id=job.get("run_id"),
            report=bool(job.get("report", True)),
            model=dict(data["model"]),
            preprocess=dict(data.get("preprocess", {})),
            rois=dict(data.get("rois", {})),
            base_dir=str(base_dir),
            **sections,
        )

    def resolve_path(self, path: str) -> Path:
        """Paths in a spec are relative to the spec's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=list))

    def fingerprint(self) -> str:
        """A short hash of everything that changes results (not runtime placement)."""
        d = self.to_dict()
        d.pop("runtime", None)
        d.pop("base_dir", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def default_run_id(self) -> str:
        return self.run_id or f"{self.name}-{self.fingerprint()}"


def _validate_sections(data: Mapping[str, Any], base_dir: str | Path) -> None:
    """Check [model], [preprocess] and [rois] with their owners' parsers, so a typo stops the job here."""
    from engine import io, models

    io.PreprocessSpec.from_dict(dict(data.get("preprocess", {})))
    io.RoISpec.from_dict(dict(data.get("rois", {})), base_dir=base_dir)
    model = dict(data["model"])
    kind = model.get("kind", "demo")
    if kind == "demo":
        extra = sorted(set(model) - {"kind", "weights"})
        if extra:
            raise JobSpecError(f"[model] kind = 'demo' takes only `weights`; remove {extra}")
    else:
        models.ModelSpec.from_dict(model, base_dir=base_dir)


@dataclass(frozen=True)
class _JobSection:
    name: str = ""
    run_id: str | None = None
    report: bool = True
