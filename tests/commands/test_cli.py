"""The command line itself: fast start, version, log level, one resume flag, exit statuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import engine
from engine import cli
from engine.commands import run as run_cmd
from engine.errors import UserError

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "monai", "captum", "ray", "duckdb", "polars", "pyarrow", "sklearn", "scipy", "nibabel", "pydantic")


def _python(code: str, *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=cwd,
                          env=env or {**os.environ, "PYTHONPATH": str(REPO)}).stdout


def test_building_every_commands_parser_imports_no_heavy_library() -> None:
    code = ("import sys, json; import engine.cli as c; c.build_parser(); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert json.loads(_python(code)) == []


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"agg2exp {engine.__version__}"


def test_one_resume_flag_with_a_negative_form() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["run", "job.toml"]).resume is True
    assert parser.parse_args(["run", "job.toml", "--no-resume"]).resume is False
    assert parser.parse_args(["run", "job.toml", "--resume"]).resume is True


def test_no_progress_bar_when_stderr_is_not_a_terminal() -> None:
    args = cli.build_parser().parse_args(["run", "job.toml"])
    assert not sys.stderr.isatty()  # pytest captures it
    assert run_cmd.show_progress(args) is False


def _patched_handler(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def handler(args):  # noqa: ARG001
        raise exc

    real = cli.build_parser

    def build():
        parser = real()
        for action in parser._subparsers._group_actions:  # noqa: SLF001
            action.choices["job-schema"].set_defaults(handler=handler)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)


def test_a_crash_exits_4_with_one_line_and_a_hint(monkeypatch, capsys) -> None:
    _patched_handler(monkeypatch, RuntimeError("tensor went sideways\nsecond line"))
    assert cli.main(["job-schema"]) == cli.EXIT_CRASH == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["agg2exp job-schema: internal error: RuntimeError: tensor went sideways; "
                   "rerun with --log-level debug for the traceback (please report it)"]


def test_a_crash_logs_its_traceback_at_debug_level(monkeypatch, capsys) -> None:
    _patched_handler(monkeypatch, RuntimeError("boom"))
    assert cli.main(["--log-level", "debug", "job-schema"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


def test_a_user_error_exits_2_and_is_not_a_crash(monkeypatch, capsys) -> None:
    _patched_handler(monkeypatch, UserError("fix the thing"))
    assert cli.main(["job-schema"]) == 2
    assert capsys.readouterr().err.strip() == "agg2exp job-schema: error: fix the thing"


def test_job_schema_prints_the_shipped_schema(capsys) -> None:
    from engine.resources import resource_path

    assert cli.main(["job-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(resource_path("job.schema.json").read_text())


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_runs_query_list_and_the_demo(tmp_path: Path) -> None:
    """`pip install .` (not editable): queries and the demo job travel as package data."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(REPO / "engine", source / "engine", ignore=shutil.ignore_patterns("__pycache__", "agg2exp_out"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    bin_dir = env_dir / "bin"
    wheel = next(wheels.glob("*.whl"))
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    located = subprocess.run([str(bin_dir / "python"), "-c", "import engine; print(engine.__file__)"], cwd=empty,
                             env=env, check=True, capture_output=True, text=True).stdout
    assert located.startswith(str(env_dir)), located
    out = subprocess.run([str(bin_dir / "agg2exp"), "query", "list"], cwd=empty, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "top_anomalies" in out
    demo = subprocess.run([str(bin_dir / "agg2exp"), "demo", "--patients", "2", "--workers", "1", "--no-report"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "2 patients done, 0 failed" in demo.stdout


def test_the_cli_vocabularies_are_the_libraries() -> None:
    from engine import store
    from engine.analytics.graph import RULES
    from engine.commands.graph import RULES as CLI_RULES
    import importlib

    from engine.vocabulary import DEFAULT_DB, MEAN_TARGET, SIGNS, STATS

    assert CLI_RULES == RULES
    assert (SIGNS, STATS, DEFAULT_DB) == (store.SIGNS, store.STATS, store.DEFAULT_DB)
    for module in ("engine.analytics.anomaly", "engine.analytics.audit"):  # the package re-exports functions of these names
        assert importlib.import_module(module).MEAN_TARGET == MEAN_TARGET


@pytest.mark.parametrize(("text", "expected"), [("aorta", "aorta"), ("site A/B", "site_A_B"), ("  ", "unnamed"),
                                                ("x..y-z_1", "x..y-z_1"), ("a\u00e9b", "a_b")])
def test_one_filename_sanitiser_for_maps_graphs_and_reports(text, expected) -> None:
    from engine.analytics.graph import safe_name
    from engine.report.nifti import safe_filename as nifti_safe
    from engine.vocabulary import safe_filename

    assert safe_filename(text) == expected
    assert safe_name is safe_filename and nifti_safe is safe_filename
