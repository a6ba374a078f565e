"""The HTML report, the figures and the report/show commands, on a real small store."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.report import figures
from engine.report.html import SECTION_IDS, split_top_bottom, write_report
from engine.report.maps import MapRecomputer, MapsUnavailable, spec_from_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def assert_valid_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.width > 10 and im.height > 10
        assert np.asarray(im).std() > 0  # not a blank image


def section_html(text: str, sid: str) -> str:
    start = text.index(f'<section id="{sid}">')
    return text[start:text.index("</section>", start)]


def test_report_has_every_section_and_valid_images(small_run, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["report", "--run", small_run.run_id, "--out", str(tmp_path), "--db", str(small_run.db),
               "--top-k", "1"])
    assert rc == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".html"
    text = path.read_text()
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in text, sid
    pngs = embedded_pngs(text)
    assert len(pngs) >= 4  # distributions, graph, ranking, patient panels
    for data in pngs:
        assert_valid_png(data)
    assert "http://" not in text and "https://" not in text  # self-contained
    summary = section_html(text, "summary")
    assert "phantom-missing" in summary and "does not exist" in summary  # the failure with its error
    anomalies = section_html(text, "anomalies")
    assert "No attribution overlays" not in anomalies  # maps were recomputed with the run's model
    assert "most anomalous" in anomalies
    assert "audit-test" in section_html(text, "audits")
    assert "exact fp32" in summary and "autocast" not in section_html(text, "audits")  # how the maps were computed
    assert "cumulative" in section_html(text, "graph")
    assert "no evaluations stored" in section_html(text, "evaluation")
    assert (tmp_path / "figures" / "distributions.png").is_file()


def test_anomalies_without_maps_show_plain_slices(small_run) -> None:
    import polars as pl

    from engine import store
    from engine.report.html import _anomalies

    with store.open(small_run.db) as s:
        info = s.run_info(small_run.run_id)
        patients = s.patients(small_run.run_id).with_columns(pl.col("patient_id").cast(pl.String))
        saved: dict[str, bytes] = {}
        text = _anomalies(s, small_run.run_id, info["config"], patients, 1, saved, recompute=False, device="cpu")
    assert "No attribution overlays" in text
    assert set(saved) == {"anomaly_ranking.png", "anomalous_patients.png"}
    with store.open(small_run.db) as s:  # the top patient's stored first reason is in the table's reasons column
        top = s.top_anomalies(small_run.run_id, k=1)["patient_id"][0]
        first = s.anomaly_reasons(small_run.run_id).filter(pl.col("patient_id") == top).sort("rank").row(0, named=True)
    assert "top reasons (robust z)" in text and f"(z {first['z']:+.1f})" in text and first["target"] in text
    for data in [*embedded_pngs(text), *saved.values()]:
        assert_valid_png(data)


def test_the_report_never_reads_the_cohorts_importances_into_memory(small_run, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Fig. 3 and Fig. 4 come from DuckDB's aggregates (boxes, drawn dots, cohort means), so a run of
    100,000 patients reports in the memory of a small one; reading the long table whole is refused here."""
    from engine import store

    def refuse(*args, **kwargs):
        raise AssertionError("the report read the whole importances table")

    monkeypatch.setattr(store.Store, "importances", refuse)
    path = write_report(small_run.db, run_id=small_run.run_id, out_dir=tmp_path, recompute_maps=False)
    text = path.read_text()
    assert "one dot per patient (4 patients)" in section_html(text, "distributions")
    assert "edges kept" in section_html(text, "graph")


def test_a_large_cohorts_ranking_is_a_curve_with_the_extremes_named() -> None:
    import polars as pl

    n = 5000
    rng = np.random.default_rng(0)
    ids = [f"p{i:05d}" for i in range(n)]
    scores = pl.DataFrame({"patient_id": ids, "target": ["__mean__"] * n, "score": rng.normal(size=n)})
    top = scores.sort("score", descending=True)["patient_id"][:2].to_list()
    fig = figures.anomaly_ranking(scores, top_k=2, labels={top[1]: "[metal]", ids[7]: "[port]"})
    ax = fig.axes[0]
    assert len(ax.get_xticklabels()) < 50 and ax.get_xscale() == "log"  # not a tick per patient
    names = [a.get_text() for a in ax.texts]
    assert names == [top[0], f"{top[1]} [metal]"]
    assert "2 patients with a note" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert_valid_png(figures.to_png(fig))
    small = figures.anomaly_ranking(scores.head(figures.MAX_BARS), top_k=2)
    assert len(small.axes[0].get_xticklabels()) == figures.MAX_BARS  # small cohorts keep a bar per patient
    figures.to_png(small)


def test_report_unknown_run(small_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--run", "nope", "--out", str(tmp_path), "--db", str(small_run.db)]) == 2
    assert "known runs" in capsys.readouterr().err


def test_show_renders_and_exports(small_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pid = small_run.manifest["patient_id"][0]
    out = tmp_path / "fig2.png"
    rc = main(["show", pid, "--target", "aorta", "--db", str(small_run.db), "--out", str(out),
               "--nifti", str(tmp_path / "nii")])
    assert rc == 0, capsys.readouterr().err
    assert_valid_png(out.read_bytes())
    assert (tmp_path / "nii" / "smoothgrad_aorta.nii.gz").is_file()
    assert (tmp_path / "nii" / "classes.txt").is_file()


def test_show_without_a_target_opens_the_class_behind_the_top_anomaly_reason(
        small_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import polars as pl

    from engine import store

    pid = small_run.manifest["patient_id"][0]
    with store.open(small_run.db) as s:
        reasons = s.anomaly_reasons(small_run.run_id).filter(pl.col("patient_id") == pid).sort("rank")
    explained = [t for t in reasons["target"] if t in ("aorta", "heart")]  # the run explains these two
    assert explained, "the fixture's reasons should name an explained class"
    out = tmp_path / "why.png"
    assert main(["show", pid, "--db", str(small_run.db), "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.startswith(f"target {explained[0]}: behind {pid}'s top anomaly reason")
    assert_valid_png(out.read_bytes())


def test_show_without_a_target_or_reasons_says_to_pass_one(small_run, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from engine import store

    db = tmp_path / "copy.duckdb"
    shutil.copy(small_run.db, db)
    with store.open_writer(db, live=False) as s:
        s.con.execute("DELETE FROM anomaly_reasons")
    pid = small_run.manifest["patient_id"][0]
    assert main(["show", pid, "--db", str(db)]) == 2
    assert "pass --target CLASS" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["show", "nobody", "--target", "aorta"], "is not in run"),
        (["show", "phantom-000", "--target", "liver"], "unknown target"),
        (["show", "phantom-000", "--target", "aorta", "--run", "nope"], "known runs"),
    ],
)
def test_show_user_errors(small_run, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--db", str(small_run.db)]) == 2
    assert expected in capsys.readouterr().err


def test_model_that_cannot_load_is_a_clear_reason(small_run, tmp_path: Path) -> None:
    from engine import store

    with store.open(small_run.db) as s:
        config = s.run_info(small_run.run_id)["config"]
    spec = spec_from_config(config)
    assert spec.attribution.targets == ("aorta", "heart")
    broken = {**config, "model": {"kind": "demo", "weights": str(tmp_path / "missing.pt")}}
    with pytest.raises(MapsUnavailable, match="could not be loaded"):
        MapRecomputer(broken)
    with pytest.raises(MapsUnavailable, match="names no model"):
        spec_from_config({"source": "x.csv"})


def test_slice_overlay_goes_through_the_target() -> None:
    image = np.random.default_rng(0).normal(size=(20, 16, 12)).astype(np.float32)
    pred = np.zeros((20, 16, 12), dtype=np.int64)
    pred[5:9, 10:12, 3] = 1  # most voxels at x in 5..8, y in 10..11, z = 3
    pred[5, 10, 4] = 1
    assert figures.focus_point(pred, 1, pred.shape) in {(5, 10, 3), (6, 10, 3), (7, 10, 3), (8, 10, 3),
                                                         (5, 11, 3), (6, 11, 3), (7, 11, 3), (8, 11, 3)}
    assert figures.focus_point(pred, 2, pred.shape) == (10, 8, 6)  # absent class: the centre
    attribution = np.zeros_like(image)
    attribution[5:9, 10:12, 3] = 1.0
    attribution[0, 0, 0] = -1.0
    fig = figures.slice_overlay(image[None], attribution, pred, "aorta")
    assert_valid_png(figures.to_png(fig))
    assert_valid_png(figures.to_png(figures.slice_overlay(image, None, None, "aorta")))


def test_split_top_bottom_is_disjoint() -> None:
    import polars as pl

    scores = pl.DataFrame({"patient_id": ["a", "b", "c"], "score": [0.3, 0.9, 0.5]})
    assert split_top_bottom(scores, 1) == (["b"], ["a"])
    top, bottom = split_top_bottom(scores, 3)
    assert top == ["b", "c", "a"] and bottom == []


def test_a_report_of_a_bf16_run_says_so_and_warns_at_its_audits(small_run, tmp_path: Path) -> None:
    import json
    import shutil

    from engine import store

    db = tmp_path / "bf16.duckdb"
    shutil.copy(small_run.db, db)
    with store.open_writer(db) as s:
        config = s.run_info(small_run.run_id)["config"]
        config["explainer"] = {**config["explainer"], "autocast": "bfloat16"}
        s.con.execute("UPDATE runs SET config = ? WHERE run_id = ?", [json.dumps(config), small_run.run_id])
    text = Path(write_report(db, run_id=small_run.run_id, out_dir=tmp_path / "out", top_k=1)).read_text()
    assert "bfloat16 autocast" in section_html(text, "summary")
    audits = section_html(text, "audits")
    assert 'class="warn"' in audits and "rerun the job without" in audits
