"""TotalSegmentator's model folders: recognised by task, named by its class map, mapped onto the thorax classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.resources import job_file

pytest.importorskip("totalsegmentator", reason="TotalSegmentator is part of the optional nnunet extra")

from totalsegmentator.map_to_binary import class_map, class_map_5_parts  # noqa: E402

from engine import phantoms  # noqa: E402
from engine.errors import JobSpecError, ModelError  # noqa: E402
from engine.jobs import JobSpec  # noqa: E402
from engine.labels import THORAX_CLASSES  # noqa: E402
from engine.models import ModelSpec, load_model, validate_model  # noqa: E402
from engine.pipeline import PatientProcessor  # noqa: E402
from engine.store import PatientResult  # noqa: E402
from tests.nnunet._folders import write_folder  # noqa: E402

SMALL = dict(patch_size=(16, 16, 16), spacing=(10.0, 9.0, 8.0), transpose=(0, 1, 2))


def _labels(names: dict[int, str]) -> dict[str, int]:
    return {"background": 0, **{n: i for i, n in names.items()}}


def _weights(root: Path) -> Path:
    """TotalSegmentator's weights layout with two models: total_fast (297) and the cardiac part (293)."""
    write_folder(root / "Dataset297_TotalSegmentator_total_3mm_1559subj"
                 / "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres",
                 _labels(class_map["total"]), mirror_axes=None, trainer="nnUNetTrainer_4000epochs_NoMirroring",
                 **SMALL)
    write_folder(root / "Dataset293_TotalSegmentator_part3_cardiac_1559subj"
                 / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres",
                 _labels(class_map_5_parts["class_map_part_cardiac"]), mirror_axes=None,
                 trainer="nnUNetTrainerNoMirroring", **SMALL)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return _weights(tmp_path_factory.mktemp("totalseg") / "results")


def test_the_117_class_model_is_found_by_task_and_named_by_totalsegmentator(weights: Path) -> None:
    loaded = load_model(ModelSpec(kind="totalsegmentator", task="total_fast", path=str(weights)))
    assert loaded.n_classes == 118
    assert loaded.class_names[0] == "background"
    assert loaded.class_names[1:] == tuple(class_map["total"][i] for i in range(1, 118))
    assert loaded.module.mirror_axes is None and loaded.blend == "nnunet"
    assert validate_model(loaded) == (1, 118, 16, 16, 16)


def test_a_part_model_of_total_is_its_own_task(weights: Path) -> None:
    loaded = load_model(ModelSpec(kind="totalsegmentator", task="total_cardiac", path=str(weights)))
    names = class_map_5_parts["class_map_part_cardiac"]
    assert loaded.class_names == ("background", *(names[i] for i in sorted(names)))
    assert "Dataset293" in loaded.source


def test_the_thorax_preset_covers_the_papers_17_classes(weights: Path) -> None:
    loaded = load_model(ModelSpec(kind="totalsegmentator", task="total_fast", path=str(weights), preset="thorax"))
    joined = loaded.joined_rois
    assert set(joined) == {"ribs", "vertebrae"}
    assert set(joined["ribs"]) == {n for n in class_map["total"].values() if n.startswith("rib_")}
    assert set(joined["vertebrae"]) == {n for n in class_map["total"].values() if n.startswith("vertebrae_")}
    # every thorax class is a class of the model or a joined RoI
    assert set(THORAX_CLASSES) <= set(loaded.class_names) | set(joined)
    assert "liver" not in loaded.targets and "heart" in loaded.targets and "rib_left_1" in loaded.targets
    assert "background" not in loaded.targets


@pytest.mark.parametrize(
    ("task", "error", "message"),
    [
        ("total", JobSpecError, "merges their label maps.*total_organs.*total_fast"),
        ("total_fastest", ModelError, "no Dataset298_\\* folder.*never downloads|no Dataset298"),
        ("lung_vessels", JobSpecError, "crop found by another model"),
        ("not_a_task", JobSpecError, "unknown"),
    ],
)
def test_tasks_the_engine_cannot_explain_say_why(weights: Path, task, error, message) -> None:
    with pytest.raises(error, match=message):
        load_model(ModelSpec(kind="totalsegmentator", task=task, path=str(weights)))


def test_a_folder_with_another_class_count_is_not_taken_for_the_task(tmp_path: Path) -> None:
    write_folder(tmp_path / "Dataset293_x" / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres",
                 {"background": 0, "heart": 1}, mirror_axes=None, **SMALL)
    with pytest.raises(ModelError, match="dataset.json has 2 classes"):
        load_model(ModelSpec(kind="totalsegmentator", task="total_cardiac", path=str(tmp_path)))


def test_a_thorax_job_explains_the_preset_classes_with_ribs_and_vertebrae_rois(tmp_path: Path, weights: Path) -> None:
    manifest = phantoms.generate_cohort(tmp_path / "c", n_patients=1, seed=1, anomaly_fraction=0.0)
    spec = JobSpec.from_dict({"job": {"name": "ts"}, "cohort": {"manifest": str(tmp_path / "c" / "manifest.csv")},
                              "model": {"kind": "totalsegmentator", "task": "total_fast", "path": str(weights),
                                        "preset": "thorax"},
                              "attribution": {"method": "saliency", "class_chunk": 16}}, base_dir=tmp_path)
    proc = PatientProcessor(spec)
    out = proc.process(manifest.row(0, named=True))
    assert isinstance(out, PatientResult), out
    targets = set(out.importances["target"])
    assert targets and targets <= set(proc.loaded.targets)
    assert {"ribs", "vertebrae"} <= set(out.importances["roi"])
    assert out.predictions.height == 118


def test_the_shipped_job_spec_parses(tmp_path: Path) -> None:
    spec = JobSpec.load(job_file("totalsegmentator_thorax.toml"))
    model = ModelSpec.from_dict(spec.model, base_dir=spec.base_dir)
    assert (model.kind, model.task, model.preset) == ("totalsegmentator", "total_fast", "thorax")
