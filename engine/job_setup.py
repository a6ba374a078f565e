"""What a job needs before its first patient: the device, the validated model, the preprocessing and the explainer.

Built once from a :class:`~engine.jobs.JobSpec` and shared by the three places that explain
volumes: the per-patient pipeline (:mod:`engine.pipeline`), the report's map recomputation
(:mod:`engine.report.maps`) and ``agg2exp evaluate``, so that all three run a job's attribution
settings through the same :class:`~engine.attribution.Explainer`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.attribution import Explainer
from engine.errors import UserError

log = logging.getLogger(__name__)

AUTOCAST: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("[runtime] device = 'cuda' but no CUDA device is visible to this worker")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_autocast(name: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a job's ``[attribution] autocast`` on ``device`` (None: exact fp32).

    ``bf16`` applies on CPUs as on GPUs when oneDNN runs bf16 natively (AVX-512 BF16 or AMX);
    on other CPUs it would be emulated and slower than fp32, so the job runs exact fp32 and says
    so in the log (the run record shows the autocast actually used). ``fp16`` only on GPUs, since
    CPU fp16 convolutions are emulated.
    """
    dtype = AUTOCAST.get(name or "")
    if dtype is None or device.type == "cuda":
        return dtype
    if dtype != torch.bfloat16:
        return None
    if not cpu_has_bf16():
        log.warning("[attribution] autocast = 'bf16' ignored: this CPU has no native bf16 (AVX-512 BF16/AMX); "
                    "running exact fp32")
        return None
    return dtype


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def build_model(spec: Any) -> Any:
    """The job's model (``engine.models.LoadedModel``), validated before any patient is processed."""
    from engine import models

    loaded = models.load_model(models.ModelSpec.from_dict(spec.model, base_dir=spec.base_dir))
    models.validate_model(loaded)
    return loaded


def given_fields(table: Any) -> dict[str, Any]:
    """The fields of a job table that differ from their defaults (what a job file sets)."""
    if table is None or isinstance(table, dict):
        return dict(table or {})
    out = {}
    for f in dataclasses.fields(table):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        value = getattr(table, f.name)
        if value != default:
            out[f.name] = value
    return out


def preprocess_for(spec: Any, loaded: Any) -> Any:
    """The preprocessing to run: the model's own where it has one (a bundle's transforms, nnU-Net's
    plans), with the job's ``[preprocess]`` keys that agree with it or that it leaves open."""
    from engine import models

    return models.effective_preprocess(loaded, given_fields(spec.preprocess))


def explainer_for(spec: Any, loaded: Any, device: torch.device, preprocess: Any) -> Explainer:
    """The job's explainer: its ``[attribution]`` settings on the model's window size, with the
    model's own sliding window where it has one (nnU-Net's tiling and gaussian).

    SmoothGrad's σ is defined against the preprocessing's output range [b_min, b_max] (the same
    for every scan); the HU window [a_min, a_max] is kept to record σ in HU.
    """
    from engine import models

    autocast = resolve_autocast(spec.attribution.autocast, device)
    explainer = Explainer.from_spec(
        spec.attribution, roi_size=loaded.roi_size, device=device, autocast=autocast,
        input_range=(preprocess.b_min, preprocess.b_max), hu_range=(preprocess.a_min, preprocess.a_max),
    )
    blend, overlap = models.effective_windows(loaded, spec.attribution)
    if (blend, overlap) != (explainer.window.blend, explainer.window.overlap):
        explainer = dataclasses.replace(explainer, window=dataclasses.replace(explainer.window, blend=blend,
                                                                               overlap=overlap))
    return explainer


def explainer_record(spec: Any, loaded: Any) -> dict[str, Any]:
    """The resolved attribution settings of a job, for the run's configuration (σ in input units and HU)."""
    return explainer_for(spec, loaded, torch.device("cpu"), preprocess_for(spec, loaded)).describe()


@dataclass
class JobSetup:
    """A job's device, loaded model (on that device, in eval mode), preprocessing, RoIs and explainer."""

    spec: Any  # engine.jobs.JobSpec
    device: torch.device
    loaded: Any  # engine.models.LoadedModel
    model: torch.nn.Module
    preprocess: Any  # engine.io.PreprocessSpec
    rois: Any  # engine.io.RoISpec
    explainer: Explainer

    @classmethod
    def from_spec(cls, spec: Any, *, device: str | None = None) -> JobSetup:
        from engine import io

        dev = resolve_device(device or spec.runtime.device)
        loaded = build_model(spec)
        preprocess = preprocess_for(spec, loaded)
        return cls(
            spec=spec, device=dev, loaded=loaded, model=loaded.module.to(dev).eval(), preprocess=preprocess,
            rois=io.RoISpec.from_dict(spec.rois, base_dir=spec.base_dir),
            explainer=explainer_for(spec, loaded, dev, preprocess),
        )

    def load(self, record: Any) -> Any:
        """Read and preprocess one case (``engine.io.Case``)."""
        from engine import io

        if self.loaded.case_loader is not None:  # nnU-Net: its own preprocessor, exactly as its plans say
            return self.loaded.case_loader(record)
        return io.load_case(record, preprocess=self.preprocess)


__all__ = ["AUTOCAST", "JobSetup", "build_model", "explainer_for", "explainer_record", "given_fields", "preprocess_for",
           "resolve_autocast", "resolve_device"]
