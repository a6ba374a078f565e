"""Segmentation models: MONAI networks by name, MONAI bundles, TorchScript, and the demo UNet.

Everything is loaded on the CPU in eval mode into a :class:`LoadedModel` that carries the
class names (one per output channel), the sliding-window size and the input channel
count.  Weights are read with ``torch.load(..., weights_only=True)``: a checkpoint that
needs arbitrary Python objects to unpickle is refused rather than executed.  Call
:func:`validate_model` once before processing patients: it runs one forward pass and checks
the output against the class list.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import JobSpecError, ModelError
from engine.labels import THORAX_CLASSES, read_names_file, resolve_class_names
from engine.settings import parse, section

#: Architecture of the shipped demo model (monai.networks.nets.UNet keyword arguments).
DEMO_ARCH: dict[str, Any] = dict(
    spatial_dims=3, in_channels=1, out_channels=17, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1
)
#: Trained demo weights (a state dict); produced by the training script, may be absent.
DEMO_WEIGHTS = Path(__file__).parent / "assets" / "demo_unet.pt"
#: Sliding-window size used with the demo model (divisible by the UNet's total stride): one window
#: covers a default phantom (48 x 40 x 40 voxels at 7 mm); larger volumes are tiled.
DEMO_ROI_SIZE: tuple[int, int, int] = (48, 40, 40)

MODEL_KINDS = ("network", "bundle", "torchscript", "nnunet", "totalsegmentator")
_NNUNET_FIELDS = ("configuration", "folds", "checkpoint", "tile_step_size", "mirroring", "trust_checkpoint", "task",
                  "preset")


@dataclass
class LoadedModel:
    """A model ready for inference: ``module`` in eval mode on the CPU and what it outputs."""

    module: nn.Module
    class_names: tuple[str, ...]
    roi_size: tuple[int, int, int]
    in_channels: int
    source: str
    overlap: float = 0.25
    #: The model's own preprocessing (a bundle's transforms, an nnU-Net plan), used instead of
    #: the job's ``[preprocess]`` where they would differ; see :func:`effective_preprocess`.
    preprocess: Any = None
    #: A model-specific reader (manifest record -> ``engine.io.Case``) replacing ``io.load_case``.
    case_loader: Any = None
    #: A blend that belongs to the model's inference (``"nnunet"``), replacing ``[attribution] blend``.
    blend: str | None = None
    #: Classes to explain when the job names none, and RoIs joined from classes (a class preset).
    targets: tuple[str, ...] | None = None
    joined_rois: dict[str, tuple[str, ...]] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


@section("model")
class ModelSpec:
    """How to build a model; the ``[model]`` table of a job spec.

    * ``kind="demo"`` (default): the shipped demo UNet; ``weights`` may name another state dict.
    * ``kind="network"``: ``name`` of a class in ``monai.networks.nets`` built with ``args``,
      plus an optional state-dict ``weights`` file.
    * ``kind="bundle"``: ``path`` of a MONAI bundle folder (``configs/inference.json|yaml``
      with ``network_def``, weights ``models/model.pt`` unless ``weights`` is given, class
      names from ``configs/metadata.json`` channel_def unless given here).
    * ``kind="torchscript"``: ``path`` of a TorchScript file.
    * ``kind="nnunet"``: ``path`` of an nnU-Net v2 trained-model folder; ``configuration``,
      ``folds``, ``checkpoint``, ``tile_step_size``, ``mirroring``, ``trust_checkpoint``
      (``engine.nnunet``). A bundle's own preprocessing is used unless
      ``ignore_bundle_preprocessing``.
    * ``kind="totalsegmentator"``: ``path`` of TotalSegmentator's weights folder, ``task`` and
      optional ``preset = "thorax"`` (``engine.totalseg``), plus the nnU-Net keys.

    Class names come from ``class_names`` (list) or ``class_names_file`` (JSON list or
    ``{index: name}``), else from the bundle.  ``roi_size`` is the sliding window (one integer
    for a cube), ``overlap`` its overlap.
    """

    kind: str = "demo"
    name: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    path: str | None = None
    class_names: tuple[str, ...] | None = None
    class_names_file: str | None = None
    roi_size: tuple[int, int, int] | int | None = None
    in_channels: int | None = None
    overlap: float = 0.25
    ignore_bundle_preprocessing: bool = False
    # nnU-Net / TotalSegmentator model folders (engine.nnunet, engine.totalseg)
    configuration: str | None = None
    folds: tuple[int | str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    tile_step_size: float = 0.5
    mirroring: bool = False
    trust_checkpoint: bool = False
    task: str | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("demo", *MODEL_KINDS):
            raise JobSpecError(f"[model] kind {self.kind!r} unknown; use one of demo, {', '.join(MODEL_KINDS)}")
        if self.kind == "demo":
            extra = sorted(f.name for f in fields(self)
                           if f.name not in ("kind", "weights") and getattr(self, f.name) != _MODEL_DEFAULTS[f.name])
            if extra:
                raise JobSpecError(f"[model] kind = 'demo' takes only `weights`; remove {extra}")
        if self.kind == "network" and not self.name:
            raise JobSpecError("[model] kind 'network' needs name, a class of monai.networks.nets (e.g. 'UNet')")
        if self.kind in ("bundle", "torchscript") and not self.path:
            raise JobSpecError(f"[model] kind {self.kind!r} needs path (the bundle folder or the TorchScript file)")
        if self.kind in ("nnunet", "totalsegmentator"):
            from engine.nnunet import check_spec

            check_spec(self)
        else:
            nnunet_only = [f.name for f in fields(self) if f.name in _NNUNET_FIELDS and getattr(self, f.name) != f.default]
            if nnunet_only:
                raise JobSpecError(f"[model] {', '.join(nnunet_only)} apply to kind 'nnunet' or 'totalsegmentator', "
                                   f"not {self.kind!r}; remove them")
        if self.ignore_bundle_preprocessing and self.kind != "bundle":
            raise JobSpecError(f"[model] ignore_bundle_preprocessing applies to kind 'bundle', not {self.kind!r}")
        if self.kind == "network" and self.path:
            raise JobSpecError("[model] kind 'network' takes weights, not path")
        if self.kind == "torchscript" and self.weights:
            raise JobSpecError("[model] a TorchScript file holds its weights; drop weights")
        if self.class_names is not None and self.class_names_file is not None:
            raise JobSpecError("[model] give class_names or class_names_file, not both")
        if isinstance(self.roi_size, int):
            object.__setattr__(self, "roi_size", (self.roi_size,) * 3)
        if self.roi_size is not None and not all(v > 0 for v in self.roi_size):
            raise JobSpecError(f"[model] roi_size must be 3 positive integers, got {self.roi_size!r}")
        if self.in_channels is not None and self.in_channels < 1:
            raise JobSpecError(f"[model] in_channels must be a positive integer, got {self.in_channels!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise JobSpecError(f"[model] overlap must be in [0, 1), got {self.overlap!r}")
        object.__setattr__(self, "args", dict(self.args))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | ModelSpec, *, base_dir: str | os.PathLike | None = None) -> ModelSpec:
        """From a job-spec table (or a spec); relative paths resolve against ``base_dir``."""
        spec = d if isinstance(d, ModelSpec) else parse(cls, d)
        if base_dir is None:
            return spec
        resolved = {key: str(Path(base_dir) / str(getattr(spec, key))) for key in ("weights", "path", "class_names_file")
                    if getattr(spec, key) and not Path(str(getattr(spec, key))).expanduser().is_absolute()}
        return replace(spec, **resolved) if resolved else spec


_MODEL_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)  # type: ignore[misc]
                   for f in fields(ModelSpec)}


# --------------------------------------------------------------------------- weights


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from JSON: a list, or ``{index: name}`` covering 0..N-1."""
    try:
        names = read_names_file(path)
    except ValueError as exc:
        raise ModelError(f"class names file {exc}") from None
    return _names_from_index_map(names, where=f"class names file {path}")


def _names_from_index_map(raw: Mapping[Any, Any], *, where: str) -> tuple[str, ...]:
    try:
        items = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ModelError(f"{where}: keys must be channel indices 0..N-1, got {list(raw)[:5]}")
    if sorted(items) != list(range(len(items))):
        raise ModelError(f"{where}: channel indices must be 0..{len(items) - 1} without gaps, got {sorted(items)}")
    return tuple(items[i] for i in range(len(items)))


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict safely: ``weights_only`` torch files, or ``.safetensors`` if installed.

    Containers ``{'state_dict': ...}``, ``{'model': ...}`` (and a few similar keys) are
    unwrapped, and ``module.`` (DataParallel) / ``_orig_mod.`` (torch.compile) prefixes stripped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"weights file {p} does not exist; check the path in the job spec")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelError(f"weights {p} are .safetensors but the safetensors package is not installed; "
                             "install it or re-save the weights with torch.save(model.state_dict())")
        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:
            raise ModelError(f"weights {p} cannot be read as safetensors ({exc})") from exc
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise ModelError(
                f"weights {p} were refused: they contain Python objects other than tensors, and loading them "
                f"would run arbitrary code ({first[:200]}); re-save only the weights with "
                "torch.save(model.state_dict(), path) from a trusted environment"
            ) from exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise ModelError(f"weights {p} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             "give a state dict saved with torch.save(model.state_dict(), path)") from exc
    for key in ("state_dict", "model", "model_state_dict", "network", "net", "weights"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights {p} do not hold a state dict (name -> tensor); "
                         "give a file saved with torch.save(model.state_dict(), path)")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        k = str(k)
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def apply_weights(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)``; on mismatch a ``ModelError`` listing the first bad keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (first: {'; '.join(shapes[:3])}; file vs network)")
        raise ModelError(f"weights {source} do not fit the network: {'; '.join(parts)}; check that the "
                         "architecture arguments match the ones used in training")
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights {source} do not fit the network: {str(exc)[:500]}") from exc


# --------------------------------------------------------------------------- builders


def build_network(name: str, args: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``monai.networks.nets.<name>(**args)`` with errors that name the problem."""
    import monai.networks.nets as nets

    cls = getattr(nets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        available = [n for n in dir(nets) if inspect.isclass(getattr(nets, n)) and issubclass(getattr(nets, n), nn.Module)]
        lower = {n.lower(): n for n in available}
        close = [lower[name.lower()]] if name.lower() in lower else [
            lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), 3)]
        raise ModelError(f"network {name!r} is not in monai.networks.nets"
                         + (f"; did you mean {', '.join(close)}?" if close else "; e.g. UNet, SwinUNETR, SegResNet"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return cls(**dict(args))
    except TypeError as exc:
        raise ModelError(f"network {name} cannot be built with args {dict(args)} ({exc}); "
                         f"its signature is {name}{inspect.signature(cls.__init__)}".replace("(self, ", "(")) from exc
    except (ValueError, AssertionError) as exc:
        raise ModelError(f"network {name} rejected args {dict(args)}: {exc}") from exc


def _finish(module: nn.Module, *, names: Sequence[str] | None, roi_size: Sequence[int] | None,
            in_channels: int, source: str, overlap: float, out_channels: int | None = None) -> LoadedModel:
    if names is None:
        if out_channels is None:
            raise ModelError(f"model {source}: no class names; give class_names (one per output channel, "
                             "background included) or class_names_file")
        names = [str(i) for i in range(out_channels)]
    try:
        class_names = resolve_class_names(out_channels if out_channels is not None else len(names), names)
    except ValueError as exc:
        raise ModelError(f"model {source}: {exc}") from exc
    module = module.to("cpu").eval()
    roi = tuple(int(v) for v in (roi_size or (96, 96, 96)))
    return LoadedModel(module=module, class_names=class_names, roi_size=roi,  # type: ignore[arg-type]
                       in_channels=int(in_channels), source=source, overlap=float(overlap))


def _spec_names(spec: ModelSpec) -> tuple[str, ...] | None:
    if spec.class_names is not None:
        return spec.class_names
    if spec.class_names_file is not None:
        return read_class_names(spec.class_names_file)
    return None


def _load_network(spec: ModelSpec) -> LoadedModel:
    assert spec.name is not None
    module = build_network(spec.name, spec.args)
    source = f"network {spec.name}"
    if spec.weights:
        apply_weights(module, load_state_dict_file(spec.weights), source=str(spec.weights))
        source += f" ({spec.weights})"
    else:
        source += " (untrained: no weights)"
    out_ch = spec.args.get("out_channels")
    in_ch = spec.in_channels or int(spec.args.get("in_channels", 1))
    return _finish(module, names=_spec_names(spec), roi_size=spec.roi_size, in_channels=in_ch, source=source,
                   overlap=spec.overlap, out_channels=int(out_ch) if out_ch is not None else None)


def _load_bundle(spec: ModelSpec) -> LoadedModel:
    from monai.bundle import ConfigParser

    root = Path(str(spec.path)).expanduser()
    if not root.is_dir():
        raise ModelError(f"bundle {root} is not a folder; give the bundle's root (with configs/ and models/)")
    configs = [root / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")]
    config = next((c for c in configs if c.is_file()), None)
    if config is None:
        raise ModelError(f"bundle {root} has no configs/inference.json or configs/inference.yaml")
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        meta_file = root / "configs" / "metadata.json"
        if meta_file.is_file():
            parser.read_meta(str(meta_file))
        parser["bundle_root"] = str(root)
        if "network_def" not in parser.get():
            raise ModelError(f"bundle {root}: {config.name} defines no network_def")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = parser.get_parsed_content("network_def")
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"bundle {root}: network_def in {config.name} cannot be built "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"bundle {root}: network_def is a {type(module).__name__}, not a torch module")
    weights = Path(spec.weights) if spec.weights else root / "models" / "model.pt"
    if not weights.is_file():
        raise ModelError(f"bundle {root}: weights {weights} not found; download the bundle's weights "
                         "into models/model.pt or give weights")
    apply_weights(module, load_state_dict_file(weights), source=str(weights))

    meta = parser.get("_meta_", {}) or {}
    fmt = (meta.get("network_data_format") or {}) if isinstance(meta, Mapping) else {}
    names = _spec_names(spec)
    if names is None:
        channel_def = ((fmt.get("outputs") or {}).get("pred") or {}).get("channel_def")
        if not channel_def:
            raise ModelError(f"bundle {root}: configs/metadata.json has no network_data_format.outputs.pred."
                             "channel_def, so the output channels have no names; add it there or give "
                             "class_names / class_names_file in the model spec")
        names = _names_from_index_map(channel_def, where=f"bundle {root} channel_def")
    in_ch = spec.in_channels or int(((fmt.get("inputs") or {}).get("image") or {}).get("num_channels", 1))
    roi = spec.roi_size
    if roi is None:
        try:
            roi = tuple(parser.get_parsed_content("inferer#roi_size"))
        except Exception:
            roi = None
    loaded = _finish(module, names=names, roi_size=roi, in_channels=in_ch, source=f"bundle {root}",
                     overlap=spec.overlap)
    if not spec.ignore_bundle_preprocessing:
        from engine.bundle_preprocess import bundle_preprocess

        image_key = next(iter((fmt.get("inputs") or {"image": None})), "image")
        loaded.preprocess = bundle_preprocess(parser, config_name=str(config), image_key=str(image_key))
    return loaded


def _load_torchscript(spec: ModelSpec) -> LoadedModel:
    p = Path(str(spec.path)).expanduser()
    if not p.is_file():
        raise ModelError(f"TorchScript file {p} does not exist")
    extra = {"metadata.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ModelError(f"{p} cannot be loaded as TorchScript ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         "give a file saved with torch.jit.save") from exc
    names = _spec_names(spec)
    if names is None and extra.get("metadata.json"):  # MONAI's save_net_with_metadata stores the bundle metadata
        try:
            meta = json.loads(extra["metadata.json"])
            cd = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
            names = _names_from_index_map(cd, where=f"TorchScript {p} metadata")
        except (ValueError, KeyError, TypeError):
            names = None
    if names is None:
        raise ModelError(f"TorchScript model {p} carries no class names; give class_names or class_names_file")
    return _finish(module, names=names, roi_size=spec.roi_size, in_channels=spec.in_channels or 1,
                   source=f"torchscript {p}", overlap=spec.overlap)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the model a spec describes (eval mode, CPU). Call :func:`validate_model` next."""
    if spec.kind == "demo":
        return demo_model(weights=spec.weights) if spec.weights else demo_model()
    if spec.kind == "network":
        return _load_network(spec)
    if spec.kind == "bundle":
        return _load_bundle(spec)
    if spec.kind == "nnunet":
        from engine.nnunet import load_nnunet

        return load_nnunet(spec)
    if spec.kind == "totalsegmentator":
        from engine.totalseg import load_totalsegmentator

        return load_totalsegmentator(spec)
    return _load_torchscript(spec)


def effective_windows(loaded: LoadedModel, attribution: Any) -> tuple[str, float]:
    """``(blend, overlap)`` of the sliding window: the model's own inference where it has one.

    An nnU-Net model is explained through nnU-Net's tiling and gaussian (``blend = "nnunet"``,
    overlap = 1 - tile_step_size); an ``[attribution]`` blend or overlap other than the defaults
    would be silently ignored, so it is refused.
    """
    if loaded.blend is None:
        return attribution.blend, attribution.overlap
    if attribution.blend != "constant" or attribution.overlap != 0.25:
        raise JobSpecError(f"[attribution] blend/overlap do not apply to {loaded.source}: it is run with its own "
                           "sliding window and gaussian; remove them and set [model] tile_step_size instead")
    return loaded.blend, loaded.overlap


def effective_preprocess(loaded: LoadedModel, job_preprocess: Mapping[str, Any] | None) -> Any:
    """The ``engine.io.PreprocessSpec`` to run: the model's own preprocessing where it has one.

    A bundle's transforms fill every ``[preprocess]`` field they fix; the job may repeat them
    or set the others (``pad_to`` for instance), and a contradiction is a ``JobSpecError`` that
    says where the model's value comes from.
    """
    from engine import io
    from engine.bundle_preprocess import merge_preprocess

    if loaded.case_loader is not None and job_preprocess:
        raise JobSpecError(f"[preprocess] does not apply to {loaded.source}: it is preprocessed exactly as its own "
                           "plans say; remove the [preprocess] table")
    return io.PreprocessSpec.from_dict(merge_preprocess(loaded.preprocess, job_preprocess, source=loaded.source))


def demo_model(*, weights: str | os.PathLike | None = DEMO_WEIGHTS) -> LoadedModel:
    """The shipped demo UNet (``DEMO_ARCH``, thorax classes); ``weights=None`` gives an untrained one."""
    if weights is not None and not Path(weights).is_file():
        raise ModelError(f"demo weights {weights} not found; they are produced by the demo training script "
                         "(or pass weights=None for an untrained model, useful only for tests)")
    torch.manual_seed(0)
    spec = ModelSpec(kind="network", name="UNet", args=dict(DEMO_ARCH),
                     weights=str(weights) if weights is not None else None,
                     class_names=THORAX_CLASSES if int(DEMO_ARCH["out_channels"]) == len(THORAX_CLASSES) else None,
                     roi_size=DEMO_ROI_SIZE, in_channels=int(DEMO_ARCH["in_channels"]))
    loaded = load_model(spec)
    loaded.source = f"demo UNet ({weights if weights is not None else 'untrained'})"
    return loaded


def paper_swin_unetr_spec(weights: str | os.PathLike | None) -> ModelSpec:
    """The paper's model: SwinUNETR v2, feature size 48, 17 thorax classes, 96^3 windows, overlap 0.25.

    (MONAI >= 1.5 removed SwinUNETR's ``img_size`` argument; the window is ``roi_size``.
    SwinUNETR's forward pass needs the ``einops`` package.)
    """
    return ModelSpec(
        kind="network",
        name="SwinUNETR",
        args=dict(in_channels=1, out_channels=len(THORAX_CLASSES), feature_size=48, use_v2=True, spatial_dims=3),
        weights=str(weights) if weights is not None else None,
        class_names=THORAX_CLASSES,
        roi_size=(96, 96, 96),
        in_channels=1,
        overlap=0.25,
    )


# --------------------------------------------------------------------------- validation


def validate_model(loaded: LoadedModel, *, roi_size: Sequence[int] | None = None) -> tuple[int, ...]:
    """One forward pass on zeros ``(1, in_channels, *roi_size)``; returns the output shape.

    Raises ``ModelError`` when the forward fails, the output is not a tensor, its channel
    count differs from the class list, or its spatial size differs from the input (a model
    that does not segment at input resolution cannot be explained voxel by voxel).
    """
    roi = tuple(int(v) for v in (roi_size or loaded.roi_size))
    shape = (1, int(loaded.in_channels), *roi)
    x = torch.zeros(shape)
    try:
        with torch.no_grad():
            y = loaded.module(x)
    except ImportError as exc:  # incl. MONAI's OptionalImportError (e.g. SwinUNETR needs einops)
        missing = getattr(exc, "name", None) or str(exc).splitlines()[0][:200]
        raise ModelError(f"model {loaded.source}: the forward pass needs a package that is not installed "
                         f"({missing}); install it in the workers' environment") from exc
    except Exception as exc:
        raise ModelError(f"model {loaded.source}: a forward pass on zeros of shape {shape} failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); check in_channels and roi_size "
                         "(many networks need sizes divisible by 16 or 32)") from exc
    if isinstance(y, (list, tuple)) and y and isinstance(y[0], torch.Tensor):
        y = y[0]  # deep supervision: the first head is the full-resolution output
    if not isinstance(y, torch.Tensor):
        raise ModelError(f"model {loaded.source}: the output is a {type(y).__name__}, not a tensor; wrap the "
                         "network so that it returns logits of shape (N, classes, X, Y, Z)")
    out = tuple(int(s) for s in y.shape)
    if len(out) != len(shape) or out[1] != len(loaded.class_names):
        raise ModelError(f"model {loaded.source}: output shape {out} has "
                         f"{out[1] if len(out) > 1 else '?'} channels but {len(loaded.class_names)} class names "
                         f"were given ({', '.join(loaded.class_names[:4])}...); give one name per output channel")
    if out[2:] != roi:
        raise ModelError(f"model {loaded.source}: output spatial size {out[2:]} differs from input size {roi}; "
                         "the model must output one prediction per input voxel")
    return out


__all__ = [
    "DEMO_ARCH",
    "DEMO_ROI_SIZE",
    "DEMO_WEIGHTS",
    "LoadedModel",
    "ModelSpec",
    "apply_weights",
    "build_network",
    "demo_model",
    "effective_preprocess",
    "effective_windows",
    "load_model",
    "load_state_dict_file",
    "paper_swin_unetr_spec",
    "read_class_names",
    "validate_model",
]
