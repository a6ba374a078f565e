"""The job spec: typed sections, one-line errors that name the key, an exact inverse, a published schema."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import jsonschema
import pytest

from engine.analytics.evaluate import EvaluateSpec
from engine.errors import JobSpecError
from engine.jobs import AnomalySpec, AttributionSpec, CohortSpec, JobSpec, RuntimeSpec, job_schema
from engine.models import ModelSpec
from engine.resources import resource_path
from engine.rois import RoISpec
from engine.volumes import PreprocessSpec

SHIPPED = sorted(resource_path("jobs").glob("*.toml"))
SCHEMA_FILE = resource_path("job.schema.json")

MINIMAL = {"job": {"name": "j"}, "cohort": {"phantoms": 2}, "model": {"kind": "demo"}}


def _with(section: str, **values) -> dict:
    data = json.loads(json.dumps(MINIMAL))
    data.setdefault(section, {}).update(values)
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_job_survives_the_round_trip_through_its_tables(path: Path) -> None:
    spec = JobSpec.load(path)
    tables = spec.to_sections()
    assert JobSpec.from_dict(tables, base_dir=spec.base_dir) == spec
    # the tables are what a TOML file holds: no None anywhere, and the stored flat form reads back too
    assert "None" not in json.dumps(tables) and "null" not in json.dumps(tables)
    assert JobSpec.from_config(spec.to_dict()) == spec


def test_a_spec_with_every_field_changed_survives_the_round_trip() -> None:
    data = {
        "job": {"name": "all", "run_id": "r1", "report": False},
        "cohort": {"manifest": "m.csv", "seed": 3, "anomaly_fraction": 0.5, "out_dir": "o", "limit": 4},
        "model": {"kind": "network", "name": "UNet", "args": {"channels": [4, 8], "spatial_dims": 3},
                  "weights": "w.pt", "class_names": ["a", "b"], "roi_size": 32, "in_channels": 1, "overlap": 0.5},
        "preprocess": {"orientation": "lps", "spacing": 2, "pad_to": [8, 8, 8], "clip": False, "a_min": -500},
        "attribution": {"method": "integrated_gradients", "steps": 7, "baseline": 0, "targets": ["a"],
                        "save_maps": ["p1"], "autocast": "bf16", "class_chunk": 2},
        "rois": {"source": "label", "label_names": {"1": "a", "2": "b"}, "joined": {"both": ["a", "b"]}},
        "runtime": {"workers": 2, "gpus_per_worker": 0.5, "in_flight": 3, "address": "auto"},
        "anomaly": {"enabled": False, "reference_run": "ref"},
        "evaluate": {"methods": ["saliency"], "targets": ["a"], "runs": 5, "stability_samples": [1, 2]},
    }
    spec = JobSpec.from_dict(data, base_dir="/jobs")
    assert spec.model.roi_size == (32, 32, 32) and spec.preprocess.spacing == (2.0, 2.0, 2.0)
    assert spec.rois.label_names == {1: "a", 2: "b"} and spec.attribution.baseline == 0.0
    assert JobSpec.from_dict(spec.to_sections(), base_dir="/jobs") == spec
    assert JobSpec.from_config(json.loads(json.dumps(spec.to_dict()))) == spec


def test_every_section_keeps_its_defaults() -> None:
    spec = JobSpec.from_dict(MINIMAL)
    assert spec.attribution == AttributionSpec() and spec.runtime == RuntimeSpec() and spec.anomaly == AnomalySpec()
    assert spec.preprocess == PreprocessSpec() and spec.rois == RoISpec() and spec.model == ModelSpec()
    assert (spec.attribution.method, spec.attribution.n_samples, spec.attribution.sigma) == ("smoothgrad", 20, 0.1)
    assert (spec.runtime.in_flight, spec.runtime.max_attempts, spec.runtime.device) == (2, 3, "auto")
    assert spec.preprocess.orientation == "RAS" and spec.rois.source == "prediction" and spec.evaluate is None


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("cohort", {"seed": "abc"}, "[cohort] seed: must be an integer, got 'abc'"),
        ("attribution", {"sigma": "0.1"}, "[attribution] sigma: must be a number, got '0.1'"),
        ("runtime", {"in_flight": 2.5}, "[runtime] in_flight: must be an integer, got 2.5"),
        ("attribution", {"targets": "aorta"}, "[attribution] targets: must be a list, got 'aorta'"),
        ("anomaly", {"enabled": "false"}, "[anomaly] enabled: must be true or false, got 'false'"),
        ("model", {"roi_size": "96"}, "[model] roi_size:"),
        ("model", {"kind": "network", "name": "UNet", "args": [1]}, "[model] args: must be a table"),
        ("preprocess", {"clip": 1}, "[preprocess] clip: must be true or false, got 1"),
        ("preprocess", {"spacing": [1, 2]}, "[preprocess] spacing"),
        ("rois", {"label_names": {"x": "a"}}, "[rois] label_names"),
        ("rois", {"sourc": "label"}, "did you mean 'source'"),
        ("evaluate", {"runs": "5"}, "[evaluate] runs: must be an integer, got '5'"),
        ("evaluate", {"runs": 1}, "[evaluate] runs must be at least 2"),
        ("evaluate", {"method": ["saliency"]}, "did you mean 'methods'"),
        ("job", {"report": "yes"}, "[job] report: must be true or false, got 'yes'"),
        ("anomaly", {"scorer": "neighbors"}, "[anomaly] scorer: unknown 'neighbors' (did you mean 'neighbours'?)"),
        ("anomaly", {"feature_set": "mass+predictions"}, "(did you mean 'mass+prediction'?)"),
        ("anomaly", {"scorer": "paper", "feature_set": "prediction"}, "feature_set 'mass' only"),
        ("anomaly", {"top_k_reasons": "3"}, "[anomaly] top_k_reasons: must be an integer, got '3'"),
        ("runtime", {"cpu_heap": "all"}, "[runtime] cpu_heap must be 'keep', 'keep-all' or 'default', got 'all'"),
    ],
)
def test_a_wrong_value_is_one_line_naming_its_table_and_key(section, values, expected) -> None:
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(_with(section, **values))
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_constructing_or_replacing_a_section_checks_it_too() -> None:
    with pytest.raises(JobSpecError, match=r"\[runtime\] in_flight: must be an integer"):
        RuntimeSpec(in_flight="2")
    with pytest.raises(JobSpecError, match=r"\[attribution\] kernels must be one of 'auto', 'engine', 'compiled', 'torch'"):
        AttributionSpec(kernels="mkl")
    with pytest.raises(JobSpecError, match=r"\[cohort\] needs exactly one of"):
        dataclasses.replace(CohortSpec(phantoms=2), manifest="m.csv")
    with pytest.raises(JobSpecError, match=r"\[evaluate\] seed"):
        EvaluateSpec(seed=0.5)


def test_every_kernel_set_reaches_the_explainers_window() -> None:
    """``[attribution] kernels`` takes the engine's kernel sets, ``compiled`` included, and hands them on."""
    from engine.attribution.explain import Explainer
    from engine.attribution.kernels import KERNELS

    assert "compiled" in KERNELS
    for kernels in KERNELS:
        explainer = Explainer.from_spec(AttributionSpec(kernels=kernels), roi_size=(16, 16, 16))
        assert explainer.window.kernels == kernels


def test_unknown_tables_get_a_did_you_mean_hint() -> None:
    with pytest.raises(JobSpecError, match="'atribution'.*did you mean 'attribution'"):
        JobSpec.from_dict({**MINIMAL, "atribution": {}})


def test_the_published_schema_is_current_and_accepts_every_shipped_job() -> None:
    schema = job_schema()
    assert json.loads(SCHEMA_FILE.read_text()) == schema, (
        "engine/resources/job.schema.json is stale: run `agg2exp job-schema > engine/resources/job.schema.json`")
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in SHIPPED:
        jsonschema.validate(tomllib.loads(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_with("attribution", sigma="0.1"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_with("runtime", in_fligth=2), schema)


def test_the_fingerprint_ignores_runtime_placement_but_not_the_method() -> None:
    a = JobSpec.from_dict(MINIMAL)
    assert a.fingerprint() == JobSpec.from_dict(_with("runtime", workers=4)).fingerprint()
    assert a.fingerprint() == JobSpec.from_dict(_with("runtime", cpu_heap="keep-all")).fingerprint()
    assert a.fingerprint() != JobSpec.from_dict(_with("attribution", method="saliency")).fingerprint()
    # writing a default out does not change it
    assert a.fingerprint() == JobSpec.from_dict(_with("attribution", sigma=0.1)).fingerprint()


def test_the_anomaly_table_defaults_to_the_benchmarks_setting_and_takes_the_papers() -> None:
    from engine.analytics.scoring import DEFAULT_SETTING

    spec = JobSpec.from_dict(_with("anomaly", scorer="paper", top_k_reasons=5))
    assert (spec.anomaly.scorer, spec.anomaly.feature_set, spec.anomaly.top_k_reasons) == ("paper", None, 5)
    default = AnomalySpec()
    assert default.scorer == DEFAULT_SETTING[0] and default.feature_set is None


def test_the_cpu_heap_modes_are_the_heaps() -> None:
    """The job spec spells the modes out (it imports nothing from the runtime): they must stay the heap's."""
    from engine.jobs import CPU_HEAP_MODES
    from engine.runtime.heap import MODES

    assert CPU_HEAP_MODES == MODES
    assert JobSpec.from_dict(_with("runtime", cpu_heap="keep-all")).runtime.cpu_heap == "keep-all"
