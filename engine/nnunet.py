"""nnU-Net v2 trained-model folders as a model source (``[model] kind = "nnunet"``).

A folder as ``nnUNetv2_train`` leaves it (``dataset.json``, ``plans.json``,
``fold_N/checkpoint_final.pth``) is loaded through nnU-Net's own classes: ``PlansManager``
reads the plans, the network is built from them with ``get_network_from_plans`` (what
``nnUNetTrainer.build_network_architecture`` does), class names come from ``dataset.json``'s
``labels`` through nnU-Net's ``LabelManager``, and each case is preprocessed by nnU-Net's
``DefaultPreprocessor.run_case_npy`` (transpose, crop to non-zero, normalisation with the plans'
intensity properties, resampling to the configuration's spacing).

The explained prediction is the one ``nnUNetPredictor.predict_sliding_window_return_logits``
returns: per window the network (averaged over the chosen folds, and with ``mirroring = true``
over nnU-Net's mirrored copies, :class:`NnUNetNetwork`), stitched with nnU-Net's tile steps and
gaussian (``blend = "nnunet"``, ``engine.attribution.nnunet_windows``). nnU-Net accumulates the
stitched logits in float16; the engine stitches in float32 the same weights, so its maps are the
exact gradients of the float32 version of that sum.

Checkpoints: nnU-Net saves the weights beside its training log (NumPy scalars), the optimiser
state and its init arguments. They are read with ``torch.load(weights_only=True)`` and an
allowlist of NumPy's scalar and dtype reconstructors only; a checkpoint that needs anything else
(a custom trainer's objects) is refused unless ``trust_checkpoint = true`` says the file comes from
a trusted source, since unpickling it runs arbitrary code.

Maps and RoIs: the model grid's voxel -> world matrix composes the transpose, the crop and nnU-Net's
resampling (``scipy.ndimage.zoom`` with ``grid_mode=True``: old = (new + 0.5) * old_n / new_n - 0.5),
so :func:`engine.io.resample_to_source` puts maps back on the source grid, and label maps and RoI
masks come onto the model grid by nearest-neighbour resampling through the same matrix.
"""

from __future__ import annotations

import itertools
import json
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import JobSpecError, ModelError

NNUNET_MISSING = ("the nnunetv2 package is not installed; install the optional extra with "
                  "pip install -c constraints.txt '.[nnunet]' (see the README)")


def require_nnunet() -> None:
    """Raise a ``ModelError`` that says how to install nnU-Net when it is absent."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise ModelError(NNUNET_MISSING) from None


def check_spec(spec: Any) -> None:
    """Checks of ``[model]`` for ``kind = "nnunet"`` / ``"totalsegmentator"`` (called by ``ModelSpec``)."""
    if not spec.path:
        what = "the trained-model folder (with dataset.json, plans.json, fold_N/)" if spec.kind == "nnunet" else \
            "the folder where TotalSegmentator's weights live (e.g. ~/.totalsegmentator/nnunet/results)"
        raise JobSpecError(f"model: kind {spec.kind!r} needs path, {what}")
    if spec.kind == "totalsegmentator" and not spec.task:
        raise JobSpecError("model: kind 'totalsegmentator' needs task, e.g. 'total_fast' or 'total_organs'")
    if spec.kind == "nnunet" and (spec.task or spec.preset):
        raise JobSpecError("model: task and preset belong to kind 'totalsegmentator'; an nnU-Net folder needs only path")
    for key in ("name", "args", "weights", "roi_size", "class_names_file"):
        if getattr(spec, key):
            raise JobSpecError(f"model: kind {spec.kind!r} takes its {key} from the model folder; remove {key}")
    if not isinstance(spec.tile_step_size, (int, float)) or not 0 < float(spec.tile_step_size) <= 1:
        raise JobSpecError(f"model: tile_step_size must be in (0, 1], got {spec.tile_step_size!r}")
    if not isinstance(spec.mirroring, bool) or not isinstance(spec.trust_checkpoint, bool):
        raise JobSpecError("model: mirroring and trust_checkpoint must be true or false")
    if spec.folds is not None:
        folds = (spec.folds,) if isinstance(spec.folds, (int, str)) else tuple(spec.folds)
        if not folds or not all((isinstance(f, int) and f >= 0) or f == "all" for f in folds):
            raise JobSpecError(f"model: folds must be fold numbers or 'all', got {spec.folds!r}")
        object.__setattr__(spec, "folds", folds)


# --------------------------------------------------------------------------- checkpoints


def _numpy_safe_globals() -> list[Any]:
    """NumPy's scalar and dtype reconstructors: they rebuild numbers, never call user code."""
    import numpy.dtypes

    out: list[Any] = [np.dtype]
    try:
        out.append(np._core.multiarray.scalar)  # NumPy 2
    except AttributeError:  # pragma: no cover - NumPy 1
        out.append(np.core.multiarray.scalar)
    out += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return out


def read_checkpoint(path: Path, *, trust: bool) -> dict[str, Any]:
    """An nnU-Net checkpoint as a dict, with ``network_weights`` a state dict of tensors."""
    if not path.is_file():
        raise ModelError(f"nnU-Net checkpoint {path} not found; give folds that exist (fold_N/) or the "
                         "checkpoint name (checkpoint, e.g. 'checkpoint_best.pth')")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_safe_globals()):
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            last = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
            raise ModelError(
                f"nnU-Net checkpoint {path} holds Python objects beyond tensors, numbers and NumPy scalars "
                f"({last}); reading it would unpickle arbitrary objects, which runs code from the file. If the "
                "file comes from a source you trust (your own training, the authors' release), set "
                "trust_checkpoint = true in [model]") from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"nnU-Net checkpoint {path} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(obj, Mapping) or not isinstance(obj.get("network_weights"), Mapping):
        raise ModelError(f"{path} is not an nnU-Net checkpoint (no 'network_weights'); give the fold's "
                         "checkpoint_final.pth")
    return dict(obj)


# --------------------------------------------------------------------------- the network


class NnUNetNetwork(nn.Module):
    """What nnU-Net predicts for one window: fold networks averaged, each with optional mirroring TTA.

    Mirroring follows ``nnUNetPredictor._internal_maybe_mirror_and_predict``: the network on the
    window and on every non-empty combination of flips along ``mirror_axes`` (flipped back),
    averaged. Folds are averaged per window, which equals nnU-Net's average of the stitched
    predictions because stitching is linear.
    """

    def __init__(self, networks: Sequence[nn.Module], mirror_axes: Sequence[int] | None) -> None:
        super().__init__()
        self.folds = nn.ModuleList(networks)
        self.mirror_axes = tuple(int(a) for a in mirror_axes) if mirror_axes else None

    def _one(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        prediction = net(x)
        if self.mirror_axes is None:
            return prediction
        axes = [m + 2 for m in self.mirror_axes]
        combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for flip in combos:
            prediction = prediction + torch.flip(net(torch.flip(x, flip)), flip)
        return prediction / (len(combos) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._one(self.folds[0], x)
        for net in self.folds[1:]:
            out = out + self._one(net, x)
        return out / len(self.folds) if len(self.folds) > 1 else out


# --------------------------------------------------------------------------- the folder


@dataclass
class NnUNetFolder:
    """A parsed trained-model folder: nnU-Net's managers, class names and the folds' weights."""

    root: Path
    dataset_json: dict[str, Any]
    plans: dict[str, Any]
    plans_manager: Any
    configuration_manager: Any
    configuration: str
    class_names: tuple[str, ...]
    in_channels: int
    checkpoints: dict[str | int, dict[str, Any]]
    mirror_axes: tuple[int, ...] | None
    trainer_name: str


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"nnU-Net folder {path.parent}: {path.name} not found; give the trained-model folder "
                         f"(nnUNet_results/DatasetXXX_Name/Trainer__Plans__configuration), which holds {what}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data


def _class_names(label_manager: Any, dataset_json: Mapping[str, Any], where: Path) -> tuple[str, ...]:
    if label_manager.has_regions:
        raise ModelError(f"{where}: the model is trained on regions (overlapping sigmoid outputs); the engine "
                         "explains softmax models with one class per channel")
    by_id: dict[int, str] = {}
    for name, value in dict(dataset_json.get("labels") or {}).items():
        if isinstance(value, (list, tuple)):
            raise ModelError(f"{where}: label {name!r} is a region {value}; regions are not supported")
        if label_manager.ignore_label is not None and int(value) == int(label_manager.ignore_label):
            continue
        by_id[int(value)] = str(name)
    n = int(label_manager.num_segmentation_heads)
    if sorted(by_id) != list(range(n)):
        raise ModelError(f"{where}: dataset.json labels {dict(dataset_json.get('labels') or {})} do not number the "
                         f"{n} output channels 0..{n - 1}")
    return tuple(by_id[i] for i in range(n))


def open_folder(root: str | Path, *, configuration: str | None = None, folds: Sequence[int | str] | None = None,
                checkpoint: str = "checkpoint_final.pth", trust_checkpoint: bool = False) -> NnUNetFolder:
    """Read a trained-model folder: plans, dataset, configuration, class names and fold checkpoints."""
    require_nnunet()
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelError(f"nnU-Net folder {root} does not exist; give the trained-model folder "
                         "(with dataset.json, plans.json and fold_N/)")
    dataset_json = _read_json(root / "dataset.json", "dataset.json, plans.json and fold_N/")
    plans = _read_json(root / "plans.json", "dataset.json, plans.json and fold_N/")
    try:
        plans_manager = PlansManager(plans)
    except Exception as exc:
        raise ModelError(f"{root / 'plans.json'} is not an nnU-Net v2 plans file ({type(exc).__name__}: {exc})") from exc
    if folds is None:
        found = sorted(p.name[5:] for p in root.glob("fold_*") if (p / checkpoint).is_file())
        if not found:
            raise ModelError(f"nnU-Net folder {root} has no fold_N/{checkpoint}; train the model or copy its folds "
                             "there (the engine never downloads weights)")
        folds = [int(f) if f.isdigit() else f for f in found]
    checkpoints = {f: read_checkpoint(root / f"fold_{f}" / checkpoint, trust=trust_checkpoint) for f in folds}
    first = next(iter(checkpoints.values()))
    init_args = first.get("init_args") if isinstance(first.get("init_args"), Mapping) else {}
    configuration = configuration or init_args.get("configuration") or "3d_fullres"
    available = list(plans.get("configurations", {}))
    if configuration not in available:
        raise ModelError(f"{root / 'plans.json'} has no configuration {configuration!r}; it has {available}")
    cm = plans_manager.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise ModelError(f"{root}: configuration {configuration!r} is 2D (patch size {cm.patch_size}); the engine "
                         "explains 3D models, use a 3d configuration")
    if cm.previous_stage_name is not None:
        raise ModelError(f"{root}: configuration {configuration!r} is a cascade stage; explain its first stage")
    label_manager = plans_manager.get_label_manager(dataset_json)
    mirror = first.get("inference_allowed_mirroring_axes")
    return NnUNetFolder(
        root=root, dataset_json=dataset_json, plans=plans, plans_manager=plans_manager, configuration_manager=cm,
        configuration=str(configuration), class_names=_class_names(label_manager, dataset_json, root),
        in_channels=int(determine_num_input_channels(plans_manager, cm, dataset_json)), checkpoints=checkpoints,
        mirror_axes=tuple(int(a) for a in mirror) if mirror is not None else None,
        trainer_name=str(first.get("trainer_name", "nnUNetTrainer")),
    )


def build_network(folder: NnUNetFolder, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """The plans' network (no deep supervision) with the given state dict, as nnU-Net's trainer builds it."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = folder.configuration_manager
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            net = get_network_from_plans(
                cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
                folder.in_channels, len(folder.class_names), allow_init=False, deep_supervision=False,
            )
        except Exception as exc:
            raise ModelError(f"{folder.root / 'plans.json'}: the network {cm.network_arch_class_name} cannot be "
                             f"built ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in weights.items()}
    from engine.models import apply_weights

    apply_weights(net, state, source=str(folder.root))
    return net.eval()


# --------------------------------------------------------------------------- preprocessing


class NnUNetCaseLoader:
    """Manifest record -> ``engine.io.Case`` preprocessed exactly as nnU-Net's ``DefaultPreprocessor``.

    The image is read by the engine (NIfTI or DICOM, checked), put in nnU-Net's axis order (the
    file's voxel axes reversed, as nnU-Net's readers give them; reoriented to RAS first when the
    plans use ``NibabelIOWithReorient``) and handed to ``run_case_npy``. Labels and RoI masks go
    onto the resulting grid by nearest-neighbour resampling through its voxel -> world matrix.
    """

    def __init__(self, folder: NnUNetFolder, *, reorient: bool = False) -> None:
        self.plans_manager = folder.plans_manager
        self.configuration_manager = folder.configuration_manager
        self.dataset_json = folder.dataset_json
        self.reorient = reorient or str(folder.plans.get("image_reader_writer", "")) == "NibabelIOWithReorient"
        name = getattr(folder.configuration_manager, "preprocessor_class", None)
        self.preprocessor = name(verbose=False) if callable(name) else None

    def __call__(self, record: Mapping[str, Any]) -> Any:
        from engine import io

        identity = io.PreprocessSpec(orientation="RAS" if self.reorient else None, spacing=None, a_min=0.0,
                                     a_max=1.0, b_min=0.0, b_max=1.0, clip=False)
        src = io.load_case(record, preprocess=identity)
        return self.preprocess(src)

    def preprocess(self, src: Any) -> Any:
        """A case on its file's grid (identity preprocessing) -> the case on nnU-Net's model grid."""
        from engine import io

        if self.preprocessor is None:
            from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

            self.preprocessor = DefaultPreprocessor(verbose=False)
        data_xyz = src.image.numpy()
        spacing_xyz = np.linalg.norm(src.affine[:3, :3], axis=0)
        data = np.ascontiguousarray(data_xyz.transpose(0, 3, 2, 1))  # nnU-Net's readers: (C, z, y, x)
        props: dict[str, Any] = {"spacing": [float(s) for s in spacing_xyz[::-1]]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, _, props = self.preprocessor.run_case_npy(
                data, None, props, self.plans_manager, self.configuration_manager, self.dataset_json)
        affine = self.grid_affine(src.affine, props, out.shape[1:])
        label = None if src.label is None else _nearest(src.label, src.affine, affine, out.shape[1:])
        rois = {k: _nearest(v, src.affine, affine, out.shape[1:]) for k, v in src.rois.items()}
        meta = dict(src.meta)
        meta.update({
            "preprocess": {"nnunet_plans": self.plans_manager.plans_name,
                           "configuration": self.configuration_manager.configuration.get("data_identifier")},
            "spacing": tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
        })
        return io.Case(patient_id=src.patient_id, image=torch.from_numpy(np.ascontiguousarray(out)).float(),
                       label=label, rois=rois, affine=affine, source_affine=src.source_affine,
                       source_shape=src.source_shape, meta=meta)

    def grid_affine(self, file_affine: np.ndarray, props: Mapping[str, Any], new_shape: Sequence[int]) -> np.ndarray:
        """Voxel -> world of nnU-Net's preprocessed grid: resampling, crop, transpose, axis reversal."""
        t = list(self.plans_manager.transpose_forward)
        crop_shape = np.asarray(props["shape_after_cropping_and_before_resampling"], dtype=float)
        scale = crop_shape / np.asarray(new_shape, dtype=float)
        lo = np.asarray([b[0] for b in props["bbox_used_for_cropping"]], dtype=float)
        # new index n -> transposed, uncropped index u = (n + 0.5) * scale - 0.5 + lo
        m = np.eye(4)
        m[:3, :3] = np.diag(scale)
        m[:3, 3] = 0.5 * scale - 0.5 + lo
        # u (transposed axes) -> zyx index: zyx[t[a]] = u[a]; zyx -> file xyz: xyz[i] = zyx[2 - i]
        perm = np.zeros((4, 4))
        perm[3, 3] = 1.0
        for a in range(3):
            perm[2 - t[a], a] = 1.0
        return np.asarray(file_affine, dtype=np.float64) @ perm @ m


def _nearest(label: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    t = MetaTensor(label[None].to(torch.float64), affine=torch.as_tensor(src_affine))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=np.float64)(
            t, dst_affine=torch.as_tensor(dst_affine), spatial_size=tuple(int(s) for s in shape))
    return torch.as_tensor(out.as_tensor()[0]).round().to(torch.int64)


# --------------------------------------------------------------------------- loading


def loaded_from_folder(folder: NnUNetFolder, spec: Any, *, source: str) -> Any:
    """A ``LoadedModel`` for an opened folder and a ``[model]`` spec."""
    from engine.models import LoadedModel

    nets = [build_network(folder, ck["network_weights"]) for ck in folder.checkpoints.values()]
    # as nnUNetPredictor: mirror only along the axes the trainer allowed (none for NoMirroring trainers)
    mirror = folder.mirror_axes if spec.mirroring else None
    module = NnUNetNetwork(nets, mirror).eval()
    names = spec.class_names or folder.class_names
    if len(names) != len(folder.class_names):
        raise ModelError(f"{source}: class_names has {len(names)} names but dataset.json has "
                         f"{len(folder.class_names)} classes")
    return LoadedModel(
        module=module, class_names=tuple(names), roi_size=tuple(int(p) for p in folder.configuration_manager.patch_size),
        in_channels=folder.in_channels, source=source, overlap=1.0 - float(spec.tile_step_size),
        case_loader=NnUNetCaseLoader(folder), blend="nnunet",
    )


def load_nnunet(spec: Any) -> Any:
    """``[model] kind = "nnunet"`` -> ``LoadedModel`` (nnU-Net's network, windows and preprocessing)."""
    folder = open_folder(spec.path, configuration=spec.configuration, folds=spec.folds, checkpoint=spec.checkpoint,
                         trust_checkpoint=spec.trust_checkpoint)
    folds = ",".join(str(f) for f in folder.checkpoints)
    source = (f"nnU-Net {folder.root.name} ({folder.configuration}, folds {folds}, "
              f"{'mirroring' if spec.mirroring else 'no mirroring'})")
    return loaded_from_folder(folder, spec, source=source)


__all__ = ["NnUNetCaseLoader", "NnUNetFolder", "NnUNetNetwork", "build_network", "check_spec", "load_nnunet",
           "loaded_from_folder", "open_folder", "read_checkpoint", "require_nnunet"]
