"""TotalSegmentator's models as a model source (``[model] kind = "totalsegmentator"``).

TotalSegmentator's models are nnU-Net v2 trained-model folders under its weights folder
(``~/.totalsegmentator/nnunet/results`` or ``$TOTALSEG_WEIGHTS_PATH``):
``Dataset<id>_<name>/<trainer>__<plans>__3d_fullres/{dataset.json, plans.json, fold_0/}``. A
``task`` names one model through TotalSegmentator's own task table (``map_tasks_config``):

* ``total`` is five part models that TotalSegmentator merges after prediction; a merge of
  argmaxes is not a function with gradients, so each part is explained on its own:
  ``total_organs``, ``total_vertebrae``, ``total_cardiac``, ``total_muscles``, ``total_ribs``
  (datasets 291–295, 1.5 mm);
* ``total_fast`` (dataset 297, 3 mm) and ``total_fastest`` (298, 6 mm) are single models with
  all 117 classes; likewise ``<task>_fast`` for TotalSegmentator's other tasks with sub-modes;
* any other task with a single model (``lung_vessels``, ``pleural_pericard_effusion``, ...).

Class names are TotalSegmentator's (``map_to_binary``), background first. Nothing is downloaded:
a missing folder is an error that says where the weights must be. As TotalSegmentator does, the
image is reoriented to the closest canonical (RAS) orientation before nnU-Net's preprocessing;
TotalSegmentator's own first resampling to the task's spacing is replaced by nnU-Net's resampling
to the same spacing (``plans.json``), and crops that TotalSegmentator takes from another model are
not reproduced (tasks that need them are refused).

``preset = "thorax"`` explains the classes that correspond to the paper's 17 thorax classes
(``engine.labels.totalsegmentator_to_thorax``) and adds the joined RoIs ``ribs`` and
``vertebrae`` (every rib / vertebra the model segments), so the thorax RoIs are all present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import JobSpecError, ModelError
from engine.labels import THORAX_CLASSES, totalsegmentator_to_thorax

#: Part models of TotalSegmentator's ``total`` task (the 1.5 mm default), by the engine's task name.
TOTAL_PARTS = {
    "total_organs": "class_map_part_organs",
    "total_vertebrae": "class_map_part_vertebrae",
    "total_cardiac": "class_map_part_cardiac",
    "total_muscles": "class_map_part_muscles",
    "total_ribs": "class_map_part_ribs",
}
PRESETS = ("thorax",)


def _require() -> None:
    try:
        import totalsegmentator  # noqa: F401
    except ImportError:
        raise ModelError("the totalsegmentator package is not installed (its task table and class names are read "
                         "from it); install the optional extra with pip install -c constraints.txt '.[nnunet]'") from None


def resolve_task(task: str) -> tuple[int, str, dict[int, str]]:
    """``(dataset id, trainer, {label id: class name})`` of one TotalSegmentator model."""
    _require()
    from totalsegmentator.map_tasks_config import TASK_CONFIGS
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    if task in TOTAL_PARTS:
        part = TOTAL_PARTS[task]
        default = TASK_CONFIGS["total"]["sub_modes"]["default"]
        ids = {v: k for k, v in map_taskid_to_partname_ct.items()}
        return int(ids[part]), str(default["trainer"]), dict(class_map_5_parts[part])
    base, mode = task, "default"
    for suffix in ("_fastest", "_fast"):
        if task.endswith(suffix) and task[: -len(suffix)] in TASK_CONFIGS:
            base, mode = task[: -len(suffix)], suffix[1:]
    if base not in TASK_CONFIGS:
        known = sorted([*TOTAL_PARTS, *(k for k in TASK_CONFIGS if k in class_map)])
        raise JobSpecError(f"model: TotalSegmentator task {task!r} unknown; e.g. {', '.join(known[:12])}, ...")
    config = TASK_CONFIGS[base]
    if "sub_modes" in config:
        if mode not in config["sub_modes"]:
            raise JobSpecError(f"model: TotalSegmentator task {base!r} has modes {list(config['sub_modes'])}")
        config = config["sub_modes"][mode]
    task_id = config.get("task_id")
    if isinstance(task_id, list):
        hint = ", ".join(TOTAL_PARTS) if base == "total" else "one of its part models"
        raise JobSpecError(f"model: TotalSegmentator task {task!r} runs {len(task_id)} models and merges their "
                           f"label maps, which has no gradient; explain one model at a time ({hint}), or "
                           f"{base}_fast for one model with all classes")
    if config.get("crop") is not None or config.get("crop_model") is not None:
        raise JobSpecError(f"model: TotalSegmentator runs task {task!r} on a crop found by another model, which the "
                           "engine does not reproduce; export the crops and explain the model as kind = 'nnunet'")
    names = class_map.get(base)
    if names is None:
        raise ModelError(f"TotalSegmentator has no class map for task {base!r}")
    return int(task_id), str(config.get("trainer", "nnUNetTrainer")), dict(names)


def model_folder(weights: str | Path, task_id: int, trainer: str) -> Path:
    """The trained-model folder of a dataset id under TotalSegmentator's weights folder."""
    root = Path(weights).expanduser()
    if (root / "plans.json").is_file():
        return root
    if not root.is_dir():
        raise ModelError(f"TotalSegmentator weights folder {root} does not exist; give the folder holding "
                         "Dataset<id>_*/ (by default ~/.totalsegmentator/nnunet/results); the engine never downloads")
    datasets = sorted(root.glob(f"Dataset{task_id:03d}_*"))
    if not datasets:
        raise ModelError(f"{root} has no Dataset{task_id:03d}_* folder, so the model is not there; fetch it once "
                         f"with TotalSegmentator (totalseg_download_weights -t <task>) into this folder")
    runs = sorted(datasets[0].glob(f"{trainer}__*__3d_fullres")) or sorted(datasets[0].glob("*__3d_fullres"))
    if not runs:
        raise ModelError(f"{datasets[0]} has no {trainer}__<plans>__3d_fullres folder")
    return runs[0]


def class_names(ts_names: dict[int, str]) -> tuple[str, ...]:
    """Channel names: background, then TotalSegmentator's classes by label id."""
    ids = sorted(ts_names)
    if ids != list(range(1, len(ids) + 1)):
        raise ModelError(f"TotalSegmentator's class map has ids {ids[:5]}...; expected 1..N")
    return ("background", *(ts_names[i] for i in ids))


def thorax_preset(names: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """Targets that correspond to the 17 thorax classes, and the joined RoIs ``ribs`` / ``vertebrae``."""
    mapping = totalsegmentator_to_thorax(dict(enumerate(names)))
    mapping[0] = "background"
    targets = tuple(names[i] for i in sorted(mapping) if i > 0)
    joined: dict[str, tuple[str, ...]] = {}
    for thorax in THORAX_CLASSES:
        parts = tuple(names[i] for i in sorted(mapping) if mapping[i] == thorax and names[i] != thorax)
        if parts:
            joined[thorax] = parts
    return targets, joined


def load_totalsegmentator(spec: Any) -> Any:
    """``[model] kind = "totalsegmentator"`` -> ``LoadedModel`` (nnU-Net's inference, TotalSegmentator's names)."""
    from engine.nnunet import NnUNetCaseLoader, loaded_from_folder, open_folder

    if spec.preset is not None and spec.preset not in PRESETS:
        raise JobSpecError(f"model: preset {spec.preset!r} unknown; known: {', '.join(PRESETS)}")
    task_id, trainer, ts_names = resolve_task(str(spec.task))
    root = model_folder(str(spec.path), task_id, trainer)
    folder = open_folder(root, configuration=spec.configuration, folds=spec.folds, checkpoint=spec.checkpoint,
                         trust_checkpoint=spec.trust_checkpoint)
    names = class_names(ts_names)
    if len(names) != len(folder.class_names):
        raise ModelError(f"{root}: dataset.json has {len(folder.class_names)} classes but TotalSegmentator's task "
                         f"{spec.task!r} has {len(names)}; is this the right folder for the task?")
    loaded = loaded_from_folder(folder, spec, source=f"TotalSegmentator {spec.task} ({root.parent.name})")
    loaded.class_names = names
    loaded.case_loader = NnUNetCaseLoader(folder, reorient=True)
    if spec.preset == "thorax":
        loaded.targets, loaded.joined_rois = thorax_preset(names)
    return loaded


__all__ = ["PRESETS", "TOTAL_PARTS", "class_names", "load_totalsegmentator", "model_folder", "resolve_task",
           "thorax_preset"]
