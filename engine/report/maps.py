"""Recompute attribution maps for a few patients of a stored run, with that run's configuration.

The store keeps only aggregated RoI rows; voxel maps are recomputed on demand for the handful of
patients a figure shows. The run's ``config`` (``JobSpec.to_dict()`` plus ``class_names``) is turned
back into a :class:`~engine.jobs.JobSpec`, and the model and explainer are built from it exactly as
the run built them (:class:`engine.job_setup.JobSetup`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError

class MapsUnavailable(UserError):
    """Maps cannot be recomputed for this run or patient (no model, no image, ...); the reason says why."""


def spec_from_config(config: Mapping[str, Any]) -> Any:
    """The :class:`~engine.jobs.JobSpec` of a stored run configuration (``runs.config``).

    ``base_dir`` is kept so relative paths still resolve.
    """
    from engine.jobs import JobSpec

    d = dict(config or {})
    if "model" not in d or "name" not in d:
        raise MapsUnavailable("the run's configuration names no model (an imported run?), so maps cannot be "
                              "recomputed; maps need a run computed by this engine")
    attribution = dict(d.get("attribution") or {})
    if "target" in attribution:  # runs stored before the explained scalar was called `objective`
        old = attribution.pop("target")
        attribution.setdefault("objective", {"probability": "softmax"}.get(old, old))
        d = {**d, "attribution": attribution}
    try:
        return JobSpec.from_config(d)
    except UserError as exc:
        raise MapsUnavailable(f"the run's configuration cannot be read back: {exc}") from None


@dataclass
class PatientMaps:
    """One patient's recomputed maps on the model grid, with the case they came from."""

    case: Any  # engine.io.Case
    explanation: Any  # engine.attribution.explain.Explanation (maps set)
    class_names: tuple[str, ...]
    method: str


class MapRecomputer:
    """Loads a run's model once and recomputes maps for patients of that run."""

    def __init__(self, config: Mapping[str, Any], *, device: str | None = "cpu") -> None:
        from engine.job_setup import JobSetup

        self.spec = spec_from_config(config)
        try:
            self.setup = JobSetup.from_spec(self.spec, device=device)
        except Exception as exc:  # noqa: BLE001 - any model problem means "no overlays", with the reason
            raise MapsUnavailable(f"the run's model could not be loaded: {exc}") from None
        self.class_names: tuple[str, ...] = tuple(self.setup.loaded.class_names)

    def load_case(self, record: Mapping[str, Any]) -> Any:
        if not record.get("image_path"):
            raise MapsUnavailable(f"patient {record.get('patient_id')} has no image path in the store")
        return self.setup.load(record)

    def compute(
        self, record: Mapping[str, Any], targets: Sequence[str] | None = None, *, method: str | None = None,
        case: Any = None,
    ) -> PatientMaps:
        """Maps of ``targets`` (default: every predicted class) for one manifest record."""
        from engine.job_setup import explainer_for

        a = self.spec.attribution
        explainer = self.setup.explainer
        if method is not None and method != a.method:
            try:
                other = dataclasses.replace(self.spec, attribution=dataclasses.replace(a, method=method))
            except UserError as exc:
                raise UserError(f"method {method!r}: {exc}") from None
            explainer = explainer_for(other, self.setup.loaded, self.setup.device, self.setup.preprocess)
        if targets is not None:
            unknown = [t for t in targets if t not in self.class_names]
            if unknown:
                raise UserError(f"unknown target class(es) {unknown}; the run's model has classes "
                                f"{list(self.class_names)}")
        case = case if case is not None else self.load_case(record)
        # The run's threads per worker, as in its actors: on a busy 2-core machine, 2 torch threads
        # made this 7-10x slower than 1 (oversubscribed oneDNN; BENCHMARKS.md).
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(self.spec.runtime.threads_per_worker)))
        try:
            explanation = explainer.explain(
                self.setup.model, case.image, targets=list(targets) if targets is not None else a.targets,
                class_names=self.class_names, return_maps=True,
            )
        finally:
            torch.set_num_threads(threads)
        return PatientMaps(case=case, explanation=explanation, class_names=self.class_names,
                           method=explanation.method)


__all__ = ["MapsUnavailable", "MapRecomputer", "PatientMaps", "spec_from_config"]
