#!/usr/bin/env bash
# Fill benchmarks/wheels with what benchmarks/attribution_gpu.py installs on a GPU machine that has
# PyTorch and nothing else of ours: run on a machine with network access, then carry benchmarks/wheels
# (ignored by git) to the GPU machine. Pure-Python wheels except numpy, which is fetched for the GPU
# machine's Python (default 3.11, manylinux x86_64; override with PYVER=3.12 etc.).
#
# Only what the engine's attribution path imports: monai (its own requirements are torch and numpy),
# captum (only captum.attr._utils.approximation_methods is used, so none of its dependencies), einops
# (SwinUNETR), numpy (in case the GPU image lacks it). polars and matplotlib are left out (~50 MB;
# the GPU script stubs polars and loads the one captum module it needs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/wheels}"
pyver="${PYVER:-3.11}"
mkdir -p "$dest"
versions() { python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo ""; }
MONAI="$(versions monai)"; MONAI="${MONAI:-1.6.1}"
CAPTUM="$(versions captum)"; CAPTUM="${CAPTUM:-0.9.0}"
EINOPS="$(versions einops)"; EINOPS="${EINOPS:-0.8.2}"
NUMPY="$(versions numpy)"; NUMPY="${NUMPY:-2.4.6}"
pip download --no-deps -d "$dest" "monai==$MONAI" "captum==$CAPTUM" "einops==$EINOPS"
pip download --no-deps -d "$dest" --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version "$pyver" "numpy==$NUMPY"
ls -la "$dest"
du -sh "$dest"
