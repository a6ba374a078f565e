"""`agg2exp run` on an nnU-Net model folder: stored importances are those of nnU-Net's exact gradients."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is the optional extra nnunet: pip install -c constraints.txt -e '.[nnunet]'")

from engine import phantoms  # noqa: E402
from engine.cli import main as cli_main  # noqa: E402
from engine.jobs import JobSpec  # noqa: E402
from engine.store import Store  # noqa: E402
from tests.nnunet._folders import write_folder  # noqa: E402
from tests.nnunet.test_nnunet_exactness import _predictor, differentiable_nnunet_logits  # noqa: E402

LABELS = {"background": 0, "aorta": 1, "heart": 2, "trachea": 3}


def _job(tmp_path: Path, model: Path, manifest: Path, *, mirroring: bool) -> Path:
    text = f"""
[job]
name = "nnunet-e2e"
report = false

[cohort]
manifest = "{manifest}"

[model]
kind = "nnunet"
path = "{model}"
mirroring = {'true' if mirroring else 'false'}

[attribution]
method = "saliency"

[runtime]
workers = 1
in_flight = 1
device = "cpu"

[anomaly]
enabled = false
"""
    path = tmp_path / f"job-{mirroring}.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mirroring", [False, True])
def test_a_run_stores_the_rois_of_nnunets_exact_gradients(tmp_path, mirroring, monkeypatch, capsys):
    manifest = phantoms.generate_cohort(tmp_path / "cohort", n_patients=1, seed=4, anomaly_fraction=0.0)
    model = write_folder(tmp_path / "model", LABELS, folds=(0,), patch_size=(16, 16, 16), spacing=(10.0, 9.0, 8.0),
                         transpose=(0, 1, 2))
    job = _job(tmp_path, model, tmp_path / "cohort" / "manifest.csv", mirroring=mirroring)
    db = tmp_path / "run.duckdb"
    # a Ray of our own, not another one running on this machine (Ray joins /tmp/ray's current cluster)
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_dir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        code = cli_main(["run", str(job), "--db", str(db), "--run-id", "e2e", "--no-progress"])
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert code == 0, capsys.readouterr().err
    with Store(db) as store:
        rows = store.importances("e2e")
    assert set(rows["method"]) == {"saliency"}
    assert set(rows["target"]) <= set(LABELS)

    # independent: the case as the worker read it, gradients by autograd through nnU-Net's predictor
    from engine.pipeline import PatientProcessor

    record = manifest.row(0, named=True)
    case = PatientProcessor(JobSpec.load(job)).load(record)
    x = case.image.clone().requires_grad_(True)
    logits = differentiable_nnunet_logits([_predictor(model, mirroring=mirroring, folds=(0,))], x, monkeypatch)
    prediction = logits.detach().argmax(0)
    names = list(LABELS)
    assert set(rows["target"]) == {names[c] for c in torch.unique(prediction).tolist()}
    for c in torch.unique(prediction).tolist():
        (grad,) = torch.autograd.grad((logits[c] * (prediction == c)).sum(), x, retain_graph=True)
        a = grad[0].abs().double()
        for r in torch.unique(prediction).tolist():
            expected = float(a[prediction == r].sum() / a.sum())
            got = rows.filter((rows["target"] == names[c]) & (rows["roi"] == names[r]) & (rows["stat"] == "mass")
                              & (rows["sign"] == "abs"))["value"].to_list()
            assert len(got) == 1 and np.isclose(got[0], expected, rtol=1e-4, atol=1e-7), (names[c], names[r])
