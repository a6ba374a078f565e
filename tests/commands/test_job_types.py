"""`agg2exp run`: a value of the wrong type stops the job with exit 2 and one line naming the table and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main as cli_main

JOB = """
[job]
name = "typed"

[cohort]
phantoms = 2
{cohort}

[model]
kind = "demo"

[attribution]
method = "smoothgrad"
{attribution}

[runtime]
{runtime}

[anomaly]
{anomaly}
"""


@pytest.mark.parametrize(
    ("section", "line", "expected"),
    [
        ("cohort", 'seed = "abc"', "[cohort] seed: must be an integer, got 'abc'"),
        ("attribution", 'sigma = "0.1"', "[attribution] sigma: must be a number, got '0.1'"),
        ("runtime", "in_flight = 2.5", "[runtime] in_flight: must be an integer, got 2.5"),
        ("attribution", 'targets = "aorta"', "[attribution] targets: must be a list"),
        ("anomaly", 'enabled = "false"', "[anomaly] enabled: must be true or false, got 'false'"),
        ("attribution", "n_samples = true", "[attribution] n_samples: must be an integer, got True"),
        ("attribution", "targets = [1, 2]", "[attribution] targets: item 1 must be a string"),
        ("attribution", "sigmaa = 0.2", "did you mean 'sigma'"),
    ],
)
def test_a_mistyped_value_stops_the_run_with_exit_2_naming_the_key(tmp_path: Path, capsys, section, line, expected):
    lines = {key: "" for key in ("cohort", "attribution", "runtime", "anomaly")}
    lines[section] = line
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(**lines))
    assert cli_main(["run", str(job), "--db", str(tmp_path / "x.duckdb"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert expected in err[0]
    assert not (tmp_path / "x.duckdb").exists()


def test_a_section_that_is_not_a_table_is_refused(tmp_path: Path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('rois = "prediction"\n' + JOB.format(cohort="", attribution="", runtime="", anomaly=""))
    assert cli_main(["run", str(job), "--db", str(tmp_path / "x.duckdb"), "--no-progress"]) == 2
    assert "[rois] must be a table" in capsys.readouterr().err
