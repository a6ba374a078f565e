"""Job specifications (``jobs/*.toml``): one typed, frozen object parsed once, with errors that say what to fix.

A job names a cohort (a manifest, or a phantom cohort to generate), a model, preprocessing, the
attribution settings, RoIs, the runtime and the analytics to run after. Every table is a section
class (``engine.settings.section``: a strict pydantic dataclass): unknown keys and wrong types stop
the job before anything runs, with one line naming the table and the key. The tables owned
elsewhere are composed here: ``[model]`` is :class:`engine.models.ModelSpec`, ``[preprocess]``
:class:`engine.volumes.PreprocessSpec`, ``[rois]`` :class:`engine.rois.RoISpec`, ``[evaluate]``
:class:`engine.analytics.evaluate.EvaluateSpec`.

``JobSpec.to_sections()`` is the exact inverse of ``JobSpec.from_dict`` (the TOML tables);
``JobSpec.to_dict()`` is the flat form stored as a run's configuration, read back by
``JobSpec.from_config``. ``job_schema()`` is the JSON Schema of a job file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.errors import JobSpecError, check_keys
from engine.models import ModelSpec
from engine.rois import RoISpec
from engine.settings import field_names, json_schema, parse, section, to_table
from engine.volumes import PreprocessSpec

#: The tables of a job file, in the order they are written.
SECTIONS = ("job", "cohort", "model", "preprocess", "attribution", "rois", "runtime", "anomaly", "evaluate")


def read_job_file(path: str | Path, *, example: str = "engine/resources/jobs/demo.toml") -> dict[str, Any]:
    """The TOML tables of a job file, with clear errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise JobSpecError(f"job spec {p} does not exist; see {example} for an example")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(f"{p} is not valid TOML: {exc}") from None


@section("cohort")
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


@section("attribution")
class AttributionSpec:
    """Attribution method and its options (names as in ``engine.explain_volume``)."""

    method: str = "smoothgrad"
    n_samples: int = 20
    sigma: float = 0.1
    steps: int = 20
    baseline: str | float = "zeros"
    ig_rule: str = "gausslegendre"  # IG quadrature: gausslegendre, paper (N evenly spaced, 1/N), riemann_*
    objective: str = "sum"  # the scalar explained per class: sum, mean, softmax, probability_weighted, legacy
    targets: tuple[str, ...] | None = None
    overlap: float = 0.25
    blend: str = "constant"
    window_batch: int = 1
    class_chunk: int | None = None
    vjp: str = "auto"
    # CPU kernels: "auto"/"engine" (engine.attribution.kernels), "compiled" (those with the norm + activation
    # backward fused by torch.compile; "auto" does that for windows of 2^19 voxels (81^3) and more) or "torch"
    kernels: str = "auto"
    autocast: str | None = None  # "bf16" or "fp16" on GPUs
    seed: int = 0
    save_maps: tuple[str, ...] = ()  # patient ids whose maps are written as NIfTI (source grid and affine)
    maps_dir: str = "agg2exp_out/maps"  # where, relative to the job file; one folder per patient
    features: str = "segments"  # kernel_shap / occlusion: "segments" or "cubes"
    cubes: int = 8  # cubes per axis when features = "cubes" (the paper: about 8)
    cube_size: int | None = None  # voxels per cube side instead of `cubes`
    kernel_shap_samples: int | None = None  # None: the paper's 200 (segments) or 1,000 (cubes)
    perturbation_baseline: str | float = "min"  # value removed features are set to

    def __post_init__(self) -> None:
        from engine.attribution.kernels import KERNEL_CHOICES, KERNELS
        from engine.attribution.methods import canonical_name, make_method
        from engine.attribution.objectives import resolve_objective

        for check in (lambda: canonical_name(self.method), lambda: resolve_objective(self.objective),
                      lambda: make_method(self.method, **self.method_options())):
            try:
                check()
            except ValueError as exc:
                raise JobSpecError(f"[attribution] {exc}") from None
        if self.blend not in ("constant", "gaussian"):
            raise JobSpecError(f"[attribution] blend must be 'constant' or 'gaussian', got {self.blend!r}")
        if not 0 <= self.overlap < 1:
            raise JobSpecError(f"[attribution] overlap must be in [0, 1), got {self.overlap}")
        if self.n_samples < 1 or self.steps < 1 or self.window_batch < 1:
            raise JobSpecError("[attribution] n_samples, steps and window_batch must be at least 1")
        if self.autocast not in (None, "bf16", "fp16"):
            raise JobSpecError(f"[attribution] autocast must be 'bf16' or 'fp16' (or absent), got {self.autocast!r}")
        if self.features not in ("segments", "cubes") or self.cubes < 1 or (self.cube_size or 1) < 1:
            raise JobSpecError("[attribution] features must be 'segments' or 'cubes', cubes and cube_size at least 1")
        if self.vjp not in ("auto", "loop", "batched"):
            raise JobSpecError(f"[attribution] vjp must be 'auto', 'loop' or 'batched', got {self.vjp!r}")
        if self.kernels not in KERNELS:
            raise JobSpecError(f"[attribution] kernels must be one of {KERNEL_CHOICES}, "
                               f"got {self.kernels!r}")

    def method_options(self) -> dict[str, Any]:
        """Options of the chosen method only, as ``explain_volume`` takes them."""
        from engine.attribution.methods import canonical_name

        method = canonical_name(self.method)
        if method == "smoothgrad":
            return {"n_samples": self.n_samples, "sigma": self.sigma}
        if method == "integrated_gradients":
            return {"steps": self.steps, "baseline": self.baseline, "rule": self.ig_rule}
        if method in ("kernel_shap", "occlusion"):
            options: dict[str, Any] = {"features": self.features, "cubes": self.cubes, "cube_size": self.cube_size,
                                       "baseline": self.perturbation_baseline}
            if method == "kernel_shap":
                options["n_samples"] = self.kernel_shap_samples
            return options
        return {}


#: ``[runtime] cpu_heap`` values: ``engine.runtime.heap.MODES`` (spelled out here: the job spec
#: imports nothing from the runtime; a test holds the two equal).
CPU_HEAP_MODES = ("keep", "keep-all", "default")


@section("runtime")
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
    patient_timeout_s: float = 3600.0  # one patient loading or computing this long: its worker is killed
    # the CPU heap of every worker (engine.runtime.heap): keep, keep-all or default; None: each node's
    # AGG2EXP_CPU_HEAP, else keep
    cpu_heap: str | None = None

    def __post_init__(self) -> None:
        if not self.worker_timeout_s > 0:
            raise JobSpecError(f"[runtime] worker_timeout_s must be positive, got {self.worker_timeout_s}")
        if not self.patient_timeout_s > 0:
            raise JobSpecError(f"[runtime] patient_timeout_s must be positive, got {self.patient_timeout_s}")
        if self.workers is not None and self.workers < 1:
            raise JobSpecError(f"[runtime] workers must be at least 1, got {self.workers}")
        if not 0 < self.gpus_per_worker <= 8:
            raise JobSpecError(f"[runtime] gpus_per_worker must be in (0, 8], got {self.gpus_per_worker}")
        if self.in_flight < 1 or self.threads_per_worker < 1 or self.max_attempts < 1:
            raise JobSpecError("[runtime] in_flight, threads_per_worker and max_attempts must be at least 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise JobSpecError(f"[runtime] device must be auto, cpu or cuda, got {self.device!r}")
        if self.cpu_heap is not None and self.cpu_heap not in CPU_HEAP_MODES:
            raise JobSpecError(f"[runtime] cpu_heap must be 'keep', 'keep-all' or 'default', got {self.cpu_heap!r}; "
                               "leave it out to use each node's AGG2EXP_CPU_HEAP")


@section("anomaly")
class AnomalySpec:
    """Anomaly scoring after the run: ``scorer`` on ``feature_set`` (``engine.analytics.scoring``), with reasons.

    The default, one k-NN per block of features (RoI masses, what the model predicted, the input over
    each predicted class) combined as robust z-scores, was chosen on held-out anomaly kinds;
    ``scorer = "paper"`` (feature set ``mass``) is the paper's per-class isolation forests.
    ``feature_set`` absent: ``mass+prediction+input``, or ``mass`` for the paper's scorer.
    """

    enabled: bool = True
    seed: int = 0
    n_estimators: int = 100  # trees per forest (forest scorers)
    reference_run: str | None = None
    scorer: str = "blocks"
    feature_set: str | None = None
    top_k_reasons: int = 3

    def __post_init__(self) -> None:
        import difflib

        from engine.analytics.scoring import FEATURE_SETS, SCORERS

        for key, value, allowed in (("scorer", self.scorer, SCORERS), ("feature_set", self.feature_set, FEATURE_SETS)):
            if value is not None and value not in allowed:
                close = difflib.get_close_matches(value, list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise JobSpecError(f"[anomaly] {key}: unknown {value!r}{hint}; choose one of {', '.join(allowed)}")
        if self.scorer == "paper" and self.feature_set not in (None, "mass"):
            raise JobSpecError(f"[anomaly] the paper's scorer takes feature_set 'mass' only, got {self.feature_set!r}")
        if self.top_k_reasons < 0 or self.n_estimators < 1:
            raise JobSpecError("[anomaly] top_k_reasons must be at least 0 and n_estimators at least 1")


@section("job")
class JobTable:
    """The ``[job]`` table: the job's name, an optional fixed run id, and whether to write the report."""

    name: str
    run_id: str | None = None
    report: bool = True


def _evaluate_spec() -> type:
    from engine.analytics.evaluate import EvaluateSpec

    return EvaluateSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole job; ``JobSpec.load(path)`` or ``JobSpec.from_dict(tables)``.

    Each section is already checked when a ``JobSpec`` exists; ``base_dir`` is the folder relative
    paths in the spec are resolved against (the job file's folder).
    """

    name: str
    run_id: str | None = None
    cohort: CohortSpec
    model: ModelSpec
    preprocess: PreprocessSpec = dataclasses.field(default_factory=PreprocessSpec)
    attribution: AttributionSpec = dataclasses.field(default_factory=AttributionSpec)
    rois: RoISpec = dataclasses.field(default_factory=RoISpec)
    runtime: RuntimeSpec = dataclasses.field(default_factory=RuntimeSpec)
    anomaly: AnomalySpec = dataclasses.field(default_factory=AnomalySpec)
    evaluate: Any = None  # engine.analytics.evaluate.EvaluateSpec for `agg2exp evaluate` jobs
    report: bool = True
    base_dir: str = "."

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        p = Path(path)
        return cls.from_dict(read_job_file(p), base_dir=p.parent.resolve())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | Path = ".") -> JobSpec:
        """The job of a job file's tables (as ``tomllib`` reads them)."""
        check_keys("the job file", data, SECTIONS)
        for key, value in data.items():
            if not isinstance(value, Mapping):
                raise JobSpecError(f"[{key}] must be a table (a [{key}] section), got {value!r}")
        job = dict(data.get("job", {}))
        if "name" not in job:
            raise JobSpecError("[job] needs a name, e.g. name = \"my-cohort\"")
        if "cohort" not in data:
            raise JobSpecError("the job needs a [cohort] section with `manifest` or `phantoms`")
        if "model" not in data:
            raise JobSpecError("the job needs a [model] section (kind = \"demo\" for the shipped model)")
        if isinstance(data.get("attribution"), Mapping) and "target" in data["attribution"]:
            raise JobSpecError("[attribution] `target` is now `objective` (the scalar explained per class: sum, "
                               "mean, softmax, probability_weighted, legacy); `targets` lists the classes")
        table = parse(JobTable, job)
        sections: dict[str, Any] = {
            key: parse(spec_cls, data.get(key))
            for key, spec_cls in (("cohort", CohortSpec), ("model", ModelSpec), ("preprocess", PreprocessSpec),
                                  ("attribution", AttributionSpec), ("rois", RoISpec), ("runtime", RuntimeSpec),
                                  ("anomaly", AnomalySpec))
        }
        if "evaluate" in data:
            sections["evaluate"] = parse(_evaluate_spec(), data["evaluate"], name="evaluate")
        spec = cls(name=table.name, run_id=table.run_id, report=table.report, base_dir=str(base_dir), **sections)
        # paths the sections name must resolve from the job file's folder; checked here, not on a worker
        ModelSpec.from_dict(spec.model, base_dir=spec.base_dir)
        RoISpec.from_dict(spec.rois, base_dir=spec.base_dir)
        return spec

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> JobSpec:
        """The job of a stored run configuration (the flat :meth:`to_dict` form)."""
        d = dict(config)
        tables: dict[str, Any] = {"job": {k: d[k] for k in field_names(JobTable) if d.get(k) is not None}}
        for key in SECTIONS[1:]:
            if isinstance(d.get(key), Mapping):
                tables[key] = {k: v for k, v in d[key].items() if v is not None}
        return cls.from_dict(tables, base_dir=d.get("base_dir") or ".")

    def to_sections(self) -> dict[str, Any]:
        """The job file's tables (``None`` left out): ``JobSpec.from_dict(spec.to_sections(), base_dir=spec.base_dir) == spec``."""
        out: dict[str, Any] = {"job": to_table(JobTable(name=self.name, run_id=self.run_id, report=self.report))}
        for key in SECTIONS[1:]:
            value = getattr(self, key)
            if value is not None:
                out[key] = to_table(value)
        return out

    def resolve_path(self, path: str) -> Path:
        """Paths in a spec are relative to the spec's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready form (sections as dicts beside ``name``, ``run_id``, ``report``, ``base_dir``)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def fingerprint(self) -> str:
        """A short hash of everything that changes results (not runtime placement)."""
        d = self.to_dict()
        d.pop("runtime", None)
        d.pop("base_dir", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def default_run_id(self) -> str:
        return self.run_id or f"{self.name}-{self.fingerprint()}"


def job_schema() -> dict[str, Any]:
    """JSON Schema of a job file (draft 2020-12), for editors that check TOML against a schema."""
    classes = {"job": JobTable, "cohort": CohortSpec, "model": ModelSpec, "preprocess": PreprocessSpec,
               "attribution": AttributionSpec, "rois": RoISpec, "runtime": RuntimeSpec, "anomaly": AnomalySpec,
               "evaluate": _evaluate_spec()}
    defs: dict[str, Any] = {}
    props: dict[str, Any] = {}
    for key, spec_cls in classes.items():
        schema = json_schema(spec_cls)
        defs.update(schema.pop("$defs", {}))
        schema["title"] = f"[{key}]"
        props[key] = schema
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "agg2exp job file",
        "type": "object",
        "properties": props,
        "required": ["job", "cohort", "model"],
        "additionalProperties": False,
    }
    if defs:
        out["$defs"] = defs
    return out


__all__ = ["AnomalySpec", "AttributionSpec", "CohortSpec", "JobSpec", "JobTable", "RuntimeSpec", "SECTIONS",
           "job_schema", "read_job_file"]
