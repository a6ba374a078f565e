"""The paper's benchmark of attribution methods (Chrabaszcz et al., WACV 2025, Table 2) and more.

Metric functions (pure torch/numpy; no DuckDB, no Ray), each on one class's attribution map:

- :func:`faithfulness_correlation` (Bhatt et al., 2020): for ``runs`` random subsets Ω_i of
  ``subset_size`` voxels, set to the image minimum (every input channel), the Pearson correlation
  between Σ_{v∈Ω_i} Â(v) and the output drop F_c(x) − F_c(x_Ω_i). Â is the max-abs normalised,
  signed attribution; F_c(x) = Σ_{v: argmax Ẑ(x)(v) = c} Ẑ_c(v; x), with the mask recomputed on
  every perturbed input (:func:`output_scores`). The same subsets serve every method in a run.
  Higher is better.
- :func:`average_sensitivity` (Yeh et al., 2019): mean over ``n_perturbations`` inputs
  x̃ = x + U(−noise, noise) (on the scaled intensities) of ‖Â(x) − Â(x̃)‖_F / ‖Â(x)‖_F, with the
  explanation of x̃ recomputed by the same method with the same settings (same seed, and
  SmoothGrad's σ of the clean input, so only the input changes). The masks M_c and, by default,
  the segments of segment-based perturbation methods are recomputed from x̃;
  ``sensitivity_partition = "clean"`` keeps the clean segments as the features (the paper's variant).
  Lower is better.
- :func:`effective_complexity`: the fraction of voxels with |A|/max|A| > ``threshold`` (0.1).
  Lower is sparser.
- Cost: wall seconds and forward-pass equivalents, ``(forwards + vjp_cost · vjps) / n_windows``
  from ``Explanation.work`` (window forwards and per-class window VJPs). A VJP is counted as
  ``vjp_cost`` = 2 forwards (a backward pass costs about twice a forward). All targets of a patient
  are explained together, so each (patient, target, method) row holds the patient's total divided
  by the number of targets explained (an amortised share).

Beyond the paper:

- RoI agreement: Spearman correlation between two methods' RoI mass vectors (``abs`` sign, RoIs =
  predicted segments), per (patient, target) and pair of methods (``method`` = ``"A~B"``).
- SmoothGrad stability: the mass vector at n = 1, 2, 4, … samples against the largest n
  (Spearman); ``stability_min_n`` is the smallest n from which the correlation stays ≥ 0.95.
  SmoothGrad's noise is drawn sequentially from one generator, so SmoothGrad(n) is the mean of the
  first n per-sample gradients; all n come from one run of max(n) samples (equal to separate runs
  up to float32 summation order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch
from scipy import stats

from engine.settings import section

#: The seven target classes of the paper's evaluation.
PAPER_TARGETS: tuple[str, ...] = (
    "background", "aorta", "lung_lower_lobe_left", "lung_lower_lobe_right", "trachea", "heart", "ribs",
)
#: Evaluated methods: name → (engine method, fixed options).
METHOD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "saliency": ("saliency", {}),
    "smoothgrad": ("smoothgrad", {}),
    "integrated_gradients": ("integrated_gradients", {}),
    "input_x_gradient": ("input_x_gradient", {}),
    "kernel_shap_segments": ("kernel_shap", {"features": "segments"}),
    "kernel_shap_cubes": ("kernel_shap", {"features": "cubes"}),
    "occlusion": ("occlusion", {"features": "segments"}),
}
#: Metric names in the evaluations table, and whether higher is better.
METRICS: dict[str, bool | None] = {
    "faithfulness_correlation": True,
    "average_sensitivity": False,
    "effective_complexity": False,
    "wall_time_s": False,
    "cost_forward_equivalents": False,
}
AGREEMENT_METRIC = "roi_agreement_spearman"
STABILITY_METRIC = "stability_spearman_n"  # followed by n
STABILITY_MIN_N = "stability_min_n"
#: The paper's subset size (224², one ImageNet image) for faithfulness correlation ...
PAPER_SUBSET_SIZE = 50_176
#: ... which is 0.2–0.4% of its CT volumes; ``--paper-defaults`` perturbs this fraction of a volume.
PAPER_SUBSET_FRACTION = 0.003
EVALUATION_COLUMNS: dict[str, pl.DataType] = {
    "patient_id": pl.String(), "target": pl.String(), "method": pl.String(), "metric": pl.String(),
    "value": pl.Float64(),
}


# ================================================================================ metrics (pure)
def max_abs_normalise(a: torch.Tensor) -> torch.Tensor:
    """a / max|a| (signed); an all-zero map stays zero."""
    m = a.abs().max()
    return a / m if float(m) > 0 else torch.zeros_like(a)


def pearson(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.pearsonr(x, y).statistic)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (ties get average ranks); NaN when either side is constant."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def random_subsets(n_voxels: int, subset_size: int, runs: int, *, seed: int) -> torch.Tensor:
    """(runs, subset_size) flat voxel indices, each row drawn without replacement (seeded)."""
    if not 1 <= subset_size <= n_voxels:
        raise ValueError(f"subset_size must be in [1, {n_voxels}] voxels, got {subset_size}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n_voxels, generator=g)[:subset_size] for _ in range(int(runs))])


def perturb_subset(x: torch.Tensor, subset: torch.Tensor, baseline: float) -> torch.Tensor:
    """Copy of ``x`` (1, C_in, *S) with the flat voxels ``subset`` set to ``baseline`` in every channel."""
    out = x.clone()
    flat = out.view(out.shape[0], out.shape[1], -1)
    flat[:, :, subset] = baseline
    return out


def output_drops(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, subsets: torch.Tensor,
                 baseline: float) -> torch.Tensor:
    """(runs, K) drops F(x) − F(x with subset i at ``baseline``); ``score_fn`` maps an input to (K,)."""
    clean = score_fn(x).double()
    return torch.stack([clean - score_fn(perturb_subset(x, s, baseline)).double() for s in subsets])


def output_scores(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(K,) F_c = Σ of class-c logits over the voxels *this* output predicts as c (mask recomputed)."""
    from engine.attribution.objectives import objective_scores

    return objective_scores(logits, logits.argmax(0), classes, "sum")


def faithfulness_correlation(attribution: torch.Tensor, subsets: torch.Tensor, drops: Sequence[float] | torch.Tensor) -> float:
    """Pearson(Σ_{v∈Ω_i} Â(v), drop_i) over the runs; Â max-abs normalised, signed."""
    a = max_abs_normalise(attribution.double()).reshape(-1)
    sums = a[subsets].sum(dim=1)
    return pearson(sums.numpy(), torch.as_tensor(drops, dtype=torch.float64).numpy())


def average_sensitivity(attribution: torch.Tensor, perturbed: Sequence[torch.Tensor]) -> float:
    """Mean of ‖Â(x) − Â(x̃)‖_F / ‖Â(x)‖_F over the perturbed explanations (max-abs normalised).

    NaN when the clean attribution is all zero (the ratio is undefined).
    """
    a = max_abs_normalise(attribution.double())
    denom = float(torch.linalg.vector_norm(a))
    if denom == 0 or not perturbed:
        return float("nan")
    return float(np.mean([float(torch.linalg.vector_norm(a - max_abs_normalise(p.double()))) / denom
                          for p in perturbed]))


def effective_complexity(attribution: torch.Tensor, threshold: float = 0.1) -> float:
    """Fraction of voxels with |A| / max|A| > ``threshold`` (0 for an all-zero map)."""
    a = max_abs_normalise(attribution.double()).abs()
    return float((a > threshold).double().mean())


def forward_equivalents(work: Mapping[str, int], n_windows: int = 1, vjp_cost: float = 2.0) -> float:
    """Cost in whole-volume forward passes: (window forwards + vjp_cost · window VJPs) / windows."""
    return (float(work.get("forwards", 0)) + vjp_cost * float(work.get("vjps", 0))) / max(int(n_windows), 1)


def smallest_stable_n(ns: Sequence[int], correlations: Sequence[float], threshold: float = 0.95) -> float:
    """The smallest n from which every correlation (at that n and all larger) is ≥ ``threshold``.

    NaN correlations count as unstable; returns NaN when even the largest n fails (it is 1.0
    against itself, so that only happens with NaNs).
    """
    best = float("nan")
    for n, r in sorted(zip(ns, correlations), reverse=True):
        if not (r >= threshold):  # also catches NaN
            break
        best = float(n)
    return best


def mass_vector(importances: pl.DataFrame, target: str, sign: str = "abs") -> dict[str, float]:
    """RoI → mass of one target (from an ``importances`` long frame)."""
    rows = importances.filter((pl.col("target") == target) & (pl.col("stat") == "mass") & (pl.col("sign") == sign))
    return dict(zip(rows["roi"].to_list(), rows["value"].to_list()))


def agreement(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman correlation of two mass vectors over the union of their RoIs (missing = 0)."""
    keys = sorted(set(a) | set(b))
    return spearman([a.get(k, 0.0) for k in keys], [b.get(k, 0.0) for k in keys])


# ================================================================================ settings
@section("evaluate")
class EvaluateSpec:
    """The ``[evaluate]`` section: what to compare and every metric parameter."""

    methods: tuple[str, ...] = tuple(METHOD_VARIANTS)
    targets: tuple[str, ...] = PAPER_TARGETS
    seed: int = 0
    # faithfulness correlation
    runs: int = 100
    subset_size: int | None = None  # voxels; None: subset_fraction of the volume
    subset_fraction: float = 0.1
    # average sensitivity
    n_perturbations: int = 3
    noise: float = 0.1
    sensitivity_partition: str = "recompute"  # or "clean": segment features of x̃ from the clean prediction
    # effective complexity
    complexity_threshold: float = 0.1
    # method options
    smoothgrad_samples: int = 20
    smoothgrad_sigma: float = 0.1  # a fraction of the model input's declared range (ModelSetup.input_range)
    ig_steps: int = 20
    ig_baseline: str | float = "zeros"
    ig_rule: str = "gausslegendre"
    kernel_shap_samples_segments: int = 200  # the paper's
    kernel_shap_samples_cubes: int = 1000  # the paper's
    cubes: int = 8  # cubes per axis (the paper: about 8)
    cube_size: int | None = None  # voxels per cube side instead of `cubes`
    perturbation_baseline: str | float = "min"
    # SmoothGrad stability of RoI importances
    stability_samples: tuple[int, ...] = (1, 2, 4, 8, 16)
    stability_threshold: float = 0.95
    stability_patients: int | None = None  # how many patients get the study (None: all; 0: none)
    # cost
    vjp_cost: float = 2.0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_VARIANTS]
        if unknown or not self.methods:
            raise ValueError(f"[evaluate] unknown method(s) {unknown}; choose from {list(METHOD_VARIANTS)}")
        if self.runs < 2:
            raise ValueError(f"[evaluate] runs must be at least 2 (a correlation needs two points), got {self.runs}")
        if self.subset_size is not None and self.subset_size < 1:
            raise ValueError(f"[evaluate] subset_size must be at least 1 voxel, got {self.subset_size}")
        if not 0 < self.subset_fraction <= 1:
            raise ValueError(f"[evaluate] subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.n_perturbations < 0 or not self.noise >= 0:
            raise ValueError("[evaluate] n_perturbations and noise must be >= 0")
        if min(self.smoothgrad_samples, self.ig_steps, self.kernel_shap_samples_segments,
               self.kernel_shap_samples_cubes, self.cubes, self.cube_size or 1) < 1:
            raise ValueError("[evaluate] smoothgrad_samples, ig_steps, kernel_shap_samples_*, cubes and cube_size "
                             "must be >= 1")
        if self.sensitivity_partition not in ("recompute", "clean"):
            raise ValueError(f"[evaluate] sensitivity_partition must be 'recompute' or 'clean', "
                             f"got {self.sensitivity_partition!r}")
        from engine.attribution.methods import make_method

        for name in self.methods:  # every method's options are checked before any patient is explained
            try:
                method, options = self.method_options(name)
                make_method(method, **options)
            except ValueError as exc:
                raise ValueError(f"[evaluate] {name}: {exc}") from None
        if self.stability_samples and min(self.stability_samples) < 1:
            raise ValueError(f"[evaluate] stability_samples must be positive, got {self.stability_samples}")

    #: The paper's parameters: 100 faithfulness runs of 0.3% of the volume (its 50,176 voxels were
    #: 0.2–0.4% of a CT), 3 perturbations of ±0.1, 20 SmoothGrad samples, IG with 20 evenly spaced
    #: steps, KernelSHAP with 200 (segments) / 1,000 (cubes) samples and 8 cubes per axis.
    PAPER: ClassVar[dict[str, Any]] = dict(
        runs=100, subset_size=None, subset_fraction=PAPER_SUBSET_FRACTION, n_perturbations=3, noise=0.1,
        complexity_threshold=0.1, smoothgrad_samples=20, smoothgrad_sigma=0.1, ig_steps=20, ig_rule="paper",
        kernel_shap_samples_segments=200, kernel_shap_samples_cubes=1000, cubes=8, cube_size=None,
        sensitivity_partition="clean",
    )

    @classmethod
    def paper(cls, **overrides: Any) -> EvaluateSpec:
        """The paper's parameters (:attr:`PAPER`), with ``overrides``."""
        return cls(**{**cls.PAPER, **overrides})

    def with_paper_defaults(self) -> EvaluateSpec:
        return replace(self, **self.PAPER)

    def subset_of(self, n_voxels: int) -> int:
        size = self.subset_size if self.subset_size is not None else max(1, round(self.subset_fraction * n_voxels))
        if size > n_voxels:
            raise ValueError(f"[evaluate] subset_size {size} exceeds the volume's {n_voxels} voxels; "
                             "lower subset_size or use subset_fraction")
        return int(size)

    def method_options(self, name: str) -> tuple[str, dict[str, Any]]:
        """Engine method and its options for an evaluated method name."""
        method, fixed = METHOD_VARIANTS[name]
        opts: dict[str, Any] = dict(fixed)
        if method == "smoothgrad":
            opts.update(n_samples=self.smoothgrad_samples, sigma=self.smoothgrad_sigma)
        elif method == "integrated_gradients":
            opts.update(steps=self.ig_steps, baseline=self.ig_baseline, rule=self.ig_rule)
        elif method in ("kernel_shap", "occlusion"):
            opts["baseline"] = self.perturbation_baseline
            cubes = opts.get("features") == "cubes"
            if method == "kernel_shap":
                opts["n_samples"] = self.kernel_shap_samples_cubes if cubes else self.kernel_shap_samples_segments
            if cubes:
                opts.update(cubes=self.cubes, cube_size=self.cube_size)
        return method, opts

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class ModelSetup:
    """How the model is run and what is explained: the class names and a base explainer.

    ``explainer`` carries the window settings, the objective and the device (its method is replaced
    by each evaluated method, its seed by ``EvaluateSpec.seed``); ``input_range`` is the model
    input's declared intensity range that SmoothGrad's σ is a fraction of (None: each clean
    image's own range, reused for its perturbed copies).
    """

    class_names: tuple[str, ...]
    explainer: Any  # engine.attribution.Explainer
    input_range: tuple[float, float] | None = None

    @classmethod
    def of(cls, roi_size: Sequence[int], class_names: Sequence[str], *, input_range: tuple[float, float] | None = None,
           **window: Any) -> ModelSetup:
        """A setup from a window size (and other :class:`~engine.attribution.SlidingWindow` settings)."""
        from engine.attribution import Explainer, Saliency, SlidingWindow

        return cls(class_names=tuple(class_names), input_range=input_range,
                   explainer=Explainer(method=Saliency(), window=SlidingWindow(roi_size=tuple(roi_size), **window)))

    def method(self, spec: EvaluateSpec, name: str) -> Any:
        """The evaluated method ``name``, built with its options (SmoothGrad's σ on ``input_range``)."""
        from engine.attribution import make_method

        method, opts = spec.method_options(name)
        if method == "smoothgrad" and self.input_range is not None:
            opts["input_range"] = self.input_range
        return make_method(method, **opts)


@dataclass
class _Explained:
    maps: torch.Tensor  # (K, *S) for the requested classes (zeros for a class not predicted)
    importances: pl.DataFrame
    seconds: float
    work: dict[str, int]
    n_explained: int


# ================================================================================ the driver
def _explain(model: torch.nn.Module, image: torch.Tensor, method: Any, classes: Sequence[str], setup: ModelSetup,
             spec: EvaluateSpec, partition: torch.Tensor | None = None) -> _Explained:
    explainer = replace(setup.explainer, method=method, seed=spec.seed)
    t0 = time.perf_counter()
    e = explainer.explain(model, image, targets=list(classes), class_names=setup.class_names, partition=partition,
                          return_maps=True)
    seconds = time.perf_counter() - t0
    maps = torch.zeros((len(classes), *image.shape[1:]))
    for i, c in enumerate(classes):
        if e.maps is not None and c in e.maps:
            maps[i] = e.maps[c].float()
    return _Explained(maps=maps, importances=e.importances, seconds=seconds, work=dict(e.work),
                      n_explained=max(len(e.targets), 1))


def smoothgrad_stability(model: torch.nn.Module, image: torch.Tensor, prediction: torch.Tensor,
                         classes: Sequence[int], setup: ModelSetup, spec: EvaluateSpec) -> dict[int, torch.Tensor]:
    """RoI-importance maps of SmoothGrad at every n in ``stability_samples``: n → (K, *S).

    One run of max(n) samples; the map at n is the mean of the first n per-sample gradients, which
    is what SmoothGrad(n_samples=n, seed) computes (same noise, drawn in the same order).
    """
    from dataclasses import replace as _replace

    from engine.attribution import Saliency, compute_maps

    ns = sorted(set(int(n) for n in spec.stability_samples))
    x = image.to(torch.float32)[None]
    sg = _replace(setup.method(spec, "smoothgrad"), n_samples=max(ns))
    generator = torch.Generator(device=x.device).manual_seed(int(spec.seed))
    total = torch.zeros((len(classes), *image.shape[1:]))
    out: dict[int, torch.Tensor] = {}
    for i, (xi, _) in enumerate(sg.passes(x, generator=generator), start=1):
        maps, _ = compute_maps(model, xi, prediction, classes, Saliency(), window=setup.explainer.window,
                               objective=setup.explainer.objective)
        total += maps.sum(dim=1).cpu()
        if i in ns:
            out[i] = total / i
    return out


def evaluate_patient(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    patient_id: str,
    setup: ModelSetup,
    spec: EvaluateSpec,
    patient_index: int = 0,
    stability: bool = True,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Every metric of every method for one patient: rows (patient_id, target, method, metric, value).

    Randomness is seeded from (``spec.seed``, ``patient_index``): the subsets and noise are the same
    for every method, and a re-run gives identical numbers.
    """
    from engine.aggregate import RoISet, aggregate
    from engine.attribution import SmoothGrad
    from engine.attribution.explain import resolve_targets
    from engine.attribution.sliding import stitched_forward

    was_training = model.training
    model.eval()
    try:
        x = image.to(torch.float32)[None]
        window = setup.explainer.window
        geometry = window.geometry(x.shape[2:])

        def logits_of(inp: torch.Tensor) -> torch.Tensor:
            return stitched_forward(model, inp, window)[0]

        clean = logits_of(x)
        prediction = clean.argmax(0)
        names = setup.class_names
        class_ids = resolve_targets(list(spec.targets), names, torch.unique(prediction).tolist())
        classes = [names[c] for c in class_ids]
        rows: list[tuple[str, str, str, str, float]] = []
        if not classes:
            return pl.DataFrame(schema=EVALUATION_COLUMNS)

        def add(target: str, method: str, metric: str, value: float) -> None:
            rows.append((patient_id, target, method, metric, float(value)))

        # explanations of the clean input; SmoothGrad's σ is pinned here, so x̃ gets the clean σ
        methods = {}
        for name in spec.methods:
            m = setup.method(spec, name)
            methods[name] = m.pinned_to(x) if isinstance(m, SmoothGrad) else m
        explained: dict[str, _Explained] = {}
        for name in spec.methods:
            explained[name] = _explain(model, image, methods[name], classes, setup, spec)
            if log:
                log(f"  {patient_id} {name}: {explained[name].seconds:.1f}s")
        # faithfulness: one set of subsets and output drops per patient, shared by the methods
        n_vox = int(np.prod(image.shape[1:]))
        subsets = random_subsets(n_vox, spec.subset_of(n_vox), spec.runs, seed=spec.seed * 1_000_003 + patient_index)
        base = float(image.min())
        drops = output_drops(lambda inp: output_scores(logits_of(inp), class_ids), x, subsets, base)
        # sensitivity: the same noisy inputs for every method
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + patient_index + 500_009)
        noisy = [image + (torch.rand(image.shape, generator=g, dtype=torch.float32) * 2 - 1) * spec.noise
                 for _ in range(spec.n_perturbations)]
        for name, ex in explained.items():
            partition = prediction if spec.sensitivity_partition == "clean" else None
            perturbed = [_explain(model, xt, methods[name], classes, setup, spec, partition).maps for xt in noisy]
            share_t = ex.seconds / ex.n_explained
            share_c = forward_equivalents(ex.work, geometry.n_windows, spec.vjp_cost) / ex.n_explained
            for k, c in enumerate(classes):
                add(c, name, "faithfulness_correlation", faithfulness_correlation(ex.maps[k], subsets, drops[:, k]))
                if perturbed:
                    add(c, name, "average_sensitivity", average_sensitivity(ex.maps[k], [p[k] for p in perturbed]))
                add(c, name, "effective_complexity", effective_complexity(ex.maps[k], spec.complexity_threshold))
                add(c, name, "wall_time_s", share_t)
                add(c, name, "cost_forward_equivalents", share_c)
        # agreement of RoI importances between methods
        names_sorted = list(explained)
        for c in classes:
            vectors = {m: mass_vector(explained[m].importances, c) for m in names_sorted}
            for i, a in enumerate(names_sorted):
                for b in names_sorted[i + 1:]:
                    add(c, f"{a}~{b}", AGREEMENT_METRIC, agreement(vectors[a], vectors[b]))
        # stability of SmoothGrad's RoI importances in the sample count
        if stability and spec.stability_samples:
            by_n = smoothgrad_stability(model, image, prediction, class_ids, setup, spec)
            rois = RoISet(prediction, names)
            masses = {n: aggregate(m, rois, classes) for n, m in by_n.items()}
            n_max = max(by_n)
            for c in classes:
                ref = mass_vector(masses[n_max], c)
                ns = sorted(by_n)
                rhos = [agreement(mass_vector(masses[n], c), ref) for n in ns]
                for n, r in zip(ns, rhos):
                    add(c, "smoothgrad", f"{STABILITY_METRIC}{n}", r)
                add(c, "smoothgrad", STABILITY_MIN_N, smallest_stable_n(ns, rhos, spec.stability_threshold))
        return pl.DataFrame(rows, schema=EVALUATION_COLUMNS, orient="row")
    finally:
        model.train(was_training)


def evaluate_cohort(
    model: torch.nn.Module,
    patients: Sequence[tuple[str, torch.Tensor]] | Any,
    *,
    setup: ModelSetup,
    spec: EvaluateSpec,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """:func:`evaluate_patient` over (patient_id, image) pairs (any iterable); rows of all patients."""
    frames = []
    for i, (pid, image) in enumerate(patients):
        t0 = time.perf_counter()
        stab = spec.stability_patients is None or i < spec.stability_patients
        frames.append(evaluate_patient(model, image, patient_id=str(pid), setup=setup, spec=spec, patient_index=i,
                                       stability=stab, log=log))
        if log:
            log(f"{pid}: evaluated in {time.perf_counter() - t0:.1f}s")
    return pl.concat(frames) if frames else pl.DataFrame(schema=EVALUATION_COLUMNS)


# ================================================================================ the table
_HEADERS = {
    "faithfulness_correlation": "Faithfulness ↑",
    "average_sensitivity": "Sensitivity ↓",
    "effective_complexity": "Complexity ↓",
    "wall_time_s": "Time [s]",
    "cost_forward_equivalents": "Cost [fwd eq.]",
}


def summary(rows: pl.DataFrame, *, by_target: bool = False) -> pl.DataFrame:
    """Mean, standard deviation and count per (method[, target], metric), NaNs left out."""
    keys = ["method", "target", "metric"] if by_target else ["method", "metric"]
    data = rows.filter(pl.col("metric").is_in(list(METRICS)) & pl.col("value").is_not_nan())
    return data.group_by(keys, maintain_order=True).agg(
        pl.col("value").mean().alias("mean"), pl.col("value").std().alias("std"), pl.len().alias("n"),
    )


def _fmt(mean: float | None, std: float | None, metric: str) -> str:
    if mean is None:
        return "—"
    digits = 2 if metric in ("wall_time_s", "cost_forward_equivalents") else 3
    s = "" if std is None or (isinstance(std, float) and math.isnan(std)) else f" ± {std:.{digits}f}"
    return f"{mean:.{digits}f}{s}"


def format_table(rows: pl.DataFrame, *, methods: Sequence[str] | None = None, target: str | None = None) -> str:
    """The paper's table: one row per method, mean ± sd per metric (overall, or for one target)."""
    data = rows if target is None else rows.filter(pl.col("target") == target)
    summ = summary(data)
    methods = [m for m in (methods or METHOD_VARIANTS) if m in set(summ["method"].to_list())]
    lookup = {(r["method"], r["metric"]): (r["mean"], r["std"]) for r in summ.iter_rows(named=True)}
    header = ["Method", *_HEADERS.values()]
    body = [[m, *(_fmt(*lookup.get((m, k), (None, None)), k) for k in _HEADERS)] for m in methods]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_agreement(rows: pl.DataFrame) -> str:
    """Mean Spearman correlation of RoI mass vectors for each pair of methods."""
    data = rows.filter((pl.col("metric") == AGREEMENT_METRIC) & pl.col("value").is_not_nan())
    if data.height == 0:
        return "(no agreement rows)"
    summ = data.group_by("method", maintain_order=True).agg(pl.col("value").mean().alias("mean"),
                                                            pl.col("value").std().alias("std"), pl.len().alias("n"))
    width = max(len(m) for m in summ["method"].to_list())
    return "\n".join(f"{r['method'].ljust(width)}  {_fmt(r['mean'], r['std'], AGREEMENT_METRIC)}  (n={r['n']})"
                     for r in summ.sort("mean", descending=True).iter_rows(named=True))


def format_stability(rows: pl.DataFrame, threshold: float = 0.95) -> str:
    """Mean Spearman(mass at n, mass at max n) per n, and the smallest stable n (mean curve and per case)."""
    data = rows.filter(pl.col("metric").str.starts_with(STABILITY_METRIC) & pl.col("value").is_not_nan())
    if data.height == 0:
        return "(no stability rows)"
    curve = data.with_columns(pl.col("metric").str.slice(len(STABILITY_METRIC)).cast(pl.Int64).alias("n")).group_by(
        "n").agg(pl.col("value").mean().alias("mean"), pl.col("value").std().alias("std")).sort("n")
    ns, means = curve["n"].to_list(), curve["mean"].to_list()
    lines = ["n = " + ", ".join(f"{n}: {_fmt(m, s, 'rho')}" for n, m, s in
                                zip(ns, means, curve["std"].to_list()))]
    lines.append(f"smallest n with mean correlation staying ≥ {threshold}: "
                 f"{smallest_stable_n(ns, means, threshold):.0f}")
    per_case = rows.filter((pl.col("metric") == STABILITY_MIN_N))["value"].to_list()
    if per_case:
        ok = [v for v in per_case if not math.isnan(v)]
        med = float(np.median(ok)) if ok else float("nan")
        lines.append(f"per (patient, target): median smallest stable n = {med:.0f} over {len(per_case)} cases")
    return "\n".join(lines)


def format_report(rows: pl.DataFrame, *, methods: Sequence[str] | None = None,
                  targets: Sequence[str] | None = None, threshold: float = 0.95) -> str:
    """Overall table, one table per target class, method agreement and SmoothGrad stability."""
    parts = ["All target classes", format_table(rows, methods=methods)]
    present = set(rows["target"].to_list())
    for t in (targets or sorted(present)):
        if t in present:
            parts += ["", f"Target class: {t}", format_table(rows, methods=methods, target=t)]
    parts += ["", "Agreement of RoI importances (Spearman of mass vectors, mean ± sd)", format_agreement(rows)]
    parts += ["", "Stability of SmoothGrad RoI importances in the sample count (Spearman vs largest n)",
              format_stability(rows, threshold)]
    return "\n".join(parts)


__all__ = [
    "AGREEMENT_METRIC",
    "EVALUATION_COLUMNS",
    "METHOD_VARIANTS",
    "METRICS",
    "PAPER_SUBSET_FRACTION",
    "PAPER_SUBSET_SIZE",
    "PAPER_TARGETS",
    "EvaluateSpec",
    "ModelSetup",
    "agreement",
    "average_sensitivity",
    "effective_complexity",
    "evaluate_cohort",
    "evaluate_patient",
    "faithfulness_correlation",
    "format_report",
    "format_table",
    "forward_equivalents",
    "max_abs_normalise",
    "output_drops",
    "output_scores",
    "pearson",
    "random_subsets",
    "smallest_stable_n",
    "smoothgrad_stability",
    "spearman",
    "summary",
]
