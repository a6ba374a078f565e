"""The input side in one import: ``from engine import io`` then ``io.load_case``, ``io.read_manifest``, ...

The code lives along the data flow: :mod:`engine.volumes` (reading and preprocessing one
patient's volumes), :mod:`engine.cohorts` (manifests, ``cohort scan``, a job's cohort) and
:mod:`engine.rois` (RoI sets for aggregation). This module only re-exports their public names.
"""

from __future__ import annotations

from engine.cohorts import manifest_rois, read_manifest, resolve_cohort, scan_cohort
from engine.rois import RoISpec, build_rois, read_label_names, rois_from_label_map, rois_from_prediction
from engine.volumes import NIFTI_SUFFIXES, Case, PreprocessSpec, load_case, resample_to_source

__all__ = [
    "NIFTI_SUFFIXES",
    "Case",
    "PreprocessSpec",
    "RoISpec",
    "build_rois",
    "load_case",
    "manifest_rois",
    "read_label_names",
    "read_manifest",
    "resample_to_source",
    "resolve_cohort",
    "rois_from_label_map",
    "rois_from_prediction",
    "scan_cohort",
]
