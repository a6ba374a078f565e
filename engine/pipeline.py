"""One patient, start to finish, without Ray: read → preprocess → model → attribution → RoI rows.

:class:`PatientProcessor` loads and validates the model once, then turns manifest records into
small results (RoI importance rows, predicted voxel counts, Dice) or a failure with a readable
reason. The Ray runtime wraps it in actors; tests and notebooks can use it directly.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from engine.errors import UserError
from engine.job_setup import JobSetup, build_model, resolve_device
from engine.jobs import JobSpec
from engine.metrics import dice_iou
from engine.results import PatientResult


@dataclass(frozen=True)
class Failure:
    """A patient that could not be processed: the reason for the user and a traceback summary."""

    patient_id: str
    error: str
    traceback: str
    worker: str


Outcome = PatientResult | Failure

__all__ = ["Failure", "Outcome", "PatientProcessor", "build_model", "failure_of", "input_statistics",
           "prediction_confidence",
           "resolve_device"]


class PatientProcessor:
    """Holds one loaded model and processes patients one at a time."""

    def __init__(self, spec: JobSpec, *, worker_name: str | None = None) -> None:
        self.spec = spec
        self.worker = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.setup = JobSetup.from_spec(spec)
        self.device, self.loaded, self.model = self.setup.device, self.setup.loaded, self.setup.model
        self.preprocess, self.rois, self.explainer = self.setup.preprocess, self.setup.rois, self.setup.explainer

    # -- stages --------------------------------------------------------------------------------
    def load(self, record: Mapping[str, Any]) -> Any:
        """CPU stage: read and preprocess one case (``engine.io.Case``)."""
        return self.setup.load(record)

    def compute(self, case: Any, *, timings: dict[str, float] | None = None) -> PatientResult:
        """Device stage: explain every class of one case and reduce to RoI rows."""
        from engine import io

        names = self.loaded.class_names
        t0 = time.perf_counter()
        rois = None
        if self.rois.source != "prediction":
            rois = io.build_rois(self.rois, case=case, class_names=names, device=self.device)
        a = self.spec.attribution
        explanation = self.explainer.explain(
            self.model, case.image, targets=a.targets or self.loaded.targets, class_names=names, rois=rois,
            joined_rois={**(self.loaded.joined_rois or {}), **self.rois.joined_parts()} if rois is None else None,
            return_maps=case.patient_id in a.save_maps, return_logits=True,
        )
        confidence, entropy = prediction_confidence(explanation.logits, explanation.prediction)
        explanation.logits = None  # the stitched logits are only needed for these two features
        input_mean, input_std = input_statistics(case.image, explanation.prediction, len(names))
        input_local = input_local_contrast(case.image, explanation.prediction, len(names))
        voxels = explanation.voxels()
        dice = dice_iou(explanation.prediction, case.label, len(names)) if case.label is not None else None
        predictions = pl.DataFrame(
            {
                "class": list(names),
                "voxels": [voxels[n] for n in names],
                "dice": [None if dice is None else dice[0][i] for i in range(len(names))],
                "iou": [None if dice is None else dice[1][i] for i in range(len(names))],
                "confidence": confidence,
                "entropy": entropy,
                "input_mean": input_mean,
                "input_std": input_std,
                "input_local": input_local,
            },
            schema={"class": pl.String, "voxels": pl.Int64, "dice": pl.Float64, "iou": pl.Float64,
                    "confidence": pl.Float64, "entropy": pl.Float64, "input_mean": pl.Float64,
                    "input_std": pl.Float64, "input_local": pl.Float64},
        )
        importances = explanation.importances.with_columns(pl.lit(explanation.method).alias("method"))
        if explanation.maps is not None:
            self._save_maps(case, explanation)
        stage = dict(timings or {})
        stage.update({k: round(v, 4) for k, v in explanation.timings.items()})
        stage["compute"] = round(time.perf_counter() - t0, 4)
        stage.update({f"work_{k}": v for k, v in explanation.work.items()})
        if explanation.options.get("memory_steps"):  # stepped down after running out of device memory
            stage["memory_steps"] = explanation.options["memory_steps"]
        return PatientResult(
            patient_id=case.patient_id, importances=importances, predictions=predictions, worker=self.worker,
            seconds=sum(v for k, v in stage.items() if k in ("load", "compute")), timings=stage,
        )

    def process(self, record: Mapping[str, Any]) -> Outcome:
        """Both stages; any error becomes a :class:`Failure` so the run goes on."""
        pid = str(record.get("patient_id"))
        try:
            t0 = time.perf_counter()
            case = self.load(record)
            return self.compute(case, timings={"load": round(time.perf_counter() - t0, 4)})
        except Exception as exc:  # noqa: BLE001 - every error is recorded against its patient
            return failure_of(pid, exc, self.worker)

    def _save_maps(self, case: Any, explanation: Any) -> None:
        from engine.report.nifti import export_explanation

        out_dir = self.spec.resolve_path(self.spec.attribution.maps_dir) / case.patient_id
        export_explanation(case, explanation, out_dir)


def prediction_confidence(logits: Any, prediction: Any) -> tuple[list[float | None], list[float | None]]:
    """Per class: mean softmax maximum and mean softmax entropy (nats) over its predicted voxels.

    ``logits`` (C, *S), ``prediction`` (*S) its argmax. None for a class with no predicted voxel.
    Entropy is ``logsumexp(l) - sum_c p_c l_c``; the sum runs one class at a time so that no second
    (C, *S) tensor is made.
    """
    import torch

    with torch.no_grad():
        lf = logits.float()
        lse = torch.logsumexp(lf, dim=0)
        conf = torch.exp(lf.max(dim=0).values - lse)
        mean_logit = torch.zeros_like(lse)
        for c in range(lf.shape[0]):
            mean_logit += torch.exp(lf[c] - lse) * lf[c]
        ent = lse - mean_logit
        n = lf.shape[0]
        labels = prediction.to(lf.device).flatten().long()
        counts = torch.bincount(labels, minlength=n).double()
        conf_sum = torch.bincount(labels, weights=conf.flatten().double(), minlength=n)
        ent_sum = torch.bincount(labels, weights=ent.flatten().double(), minlength=n)
    conf_mean = [None if k == 0 else float(v / k) for v, k in zip(conf_sum.tolist(), counts.tolist())]
    ent_mean = [None if k == 0 else float(v / k) for v, k in zip(ent_sum.tolist(), counts.tolist())]
    return conf_mean, ent_mean


def input_statistics(image: Any, prediction: Any, n_classes: int) -> tuple[list[float | None], list[float | None]]:
    """Per class: mean and standard deviation of the model's input over the class's predicted voxels.

    ``image`` (C, *S) is the preprocessed volume the model saw (for several channels, the voxel's
    mean over channels), ``prediction`` (*S) the argmax on the same grid, with labels below
    ``n_classes``. These see what an
    acquisition fault does to a structure (a calibration offset, noise, mistimed contrast, metal)
    whether or not it moves the explanation. None for a class with no predicted voxel; the standard
    deviation is the population one (ddof 0), from float64 sums.
    """
    import torch

    with torch.no_grad():
        voxels, labels = _on_grid(image, prediction, torch.float64)
        values = voxels.flatten()
        n = n_classes
        counts = torch.bincount(labels, minlength=n).double()
        mean = torch.bincount(labels, weights=values, minlength=n) / counts.clamp_min(1)
        centred = values - mean[labels]  # two passes: no cancellation for large offsets
        var = torch.bincount(labels, weights=centred * centred, minlength=n) / counts.clamp_min(1)
    means = [None if k == 0 else float(m) for m, k in zip(mean.tolist(), counts.tolist())]
    stds = [None if k == 0 else float(v) ** 0.5 for v, k in zip(var.tolist(), counts.tolist())]
    return means, stds


def _on_grid(image: Any, prediction: Any, dtype: Any) -> tuple[Any, Any]:
    """The voxels' input (mean over channels, in ``dtype``, on the image's device, shape *S) and
    the flat long labels of ``prediction`` there; a one-line error when they are not on one grid."""
    values = image.detach().to(dtype).mean(dim=0)
    labels = prediction.to(values.device).flatten().long()
    if values.numel() != labels.numel():
        raise ValueError(f"input of {values.numel()} voxels per channel and prediction of {labels.numel()} "
                         "voxels are not on the same grid")
    return values, labels


#: The quantile of the local contrast (:func:`input_local_contrast`) stored per predicted class.
LOCAL_QUANTILE = 0.999


def input_local_contrast(image: Any, prediction: Any, n_classes: int,
                         q: float = LOCAL_QUANTILE) -> list[float | None]:
    """Per class: the ``q`` quantile, over the class's predicted voxels, of how far each voxel's
    input stands out from its 3 x 3 x 3 neighbourhood: ``|x - mean of the 27 voxels around and at
    it|`` (edges replicated, as ``scipy.ndimage.uniform_filter(mode="nearest")``).

    A class's mean and spread (:func:`input_statistics`) dilute a change that covers a few voxels:
    a pacemaker lead, a port, ECG wires, a small mass, mistimed contrast in vessels. The high
    quantile of the local contrast keeps it (BENCHMARKS.md, anomaly detection). ``image`` (C, *S)
    is the preprocessed volume (for several channels, their mean), ``prediction`` (*S) the argmax on
    the same grid. Quantiles interpolate linearly (NumPy's default). None for a class with no
    predicted voxel. Computed on the image's device; one extra volume of memory and a stable sort
    of the labels.
    """
    import torch

    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    with torch.no_grad():
        x, labels = _on_grid(image, prediction, torch.float32)
        if x.dim() != 3:
            raise ValueError(f"expected a (C, D, H, W) image, got shape {tuple(image.shape)}")
        padded = torch.nn.functional.pad(x[None, None], (1,) * 6, mode="replicate")
        local = (x - torch.nn.functional.avg_pool3d(padded, 3, stride=1)[0, 0]).abs().flatten()
        order = torch.sort(labels, stable=True).indices
        grouped, counts = local[order], torch.bincount(labels, minlength=n_classes).tolist()
    out: list[float | None] = []
    start = 0
    for n in counts[:n_classes]:
        if n == 0:
            out.append(None)
            continue
        v = grouped[start:start + n]
        start += n
        h = (n - 1) * q
        lo = int(h)
        a = float(torch.kthvalue(v, lo + 1).values)
        b = float(torch.kthvalue(v, min(lo + 2, n)).values) if h > lo else a
        out.append(a + (h - lo) * (b - a))
    return out


def failure_of(patient_id: str, exc: BaseException, worker: str) -> Failure:
    """A readable failure: user errors keep their message; others get their type in front."""
    message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
    return Failure(patient_id=patient_id, error=message.strip() or type(exc).__name__, traceback=tb[-4000:], worker=worker)
