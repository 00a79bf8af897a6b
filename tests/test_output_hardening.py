"""Failing outputs and options out of range: one line, the right exit code, nothing half-done.

A full disk is simulated by making ``os.fsync`` (called on every output before
its rename) or a figure's ``savefig`` raise ENOSPC; a read-only folder by
``chmod 555`` when not running as root, else by making ``tempfile.mkstemp``
raise EACCES. Every test compares a snapshot of the folder before and after.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from svdrank.analysis import pipeline
from tests.conftest import SAMPLES, assert_one_line_error

BASE = SAMPLES / "base.safetensors"
TUNED = SAMPLES / "tuned.safetensors"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes (dot files included)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from svdrank.cli import app

    path = tmp_path_factory.mktemp("analysis") / "a.json"
    result = CliRunner().invoke(app, ["diff", str(BASE), str(TUNED), "-o", str(path), "-q"])
    assert result.exit_code == 0, result.stderr
    return path


def _full_disk(monkeypatch) -> None:
    def no_space(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)


def test_full_disk_while_writing_the_analysis_keeps_the_old_file(tmp_path, run_cli, monkeypatch):
    out = tmp_path / "a.json"
    out.write_text("previous analysis\n")
    before = _snapshot(tmp_path)
    _full_disk(monkeypatch)

    result = run_cli("diff", BASE, TUNED, "-o", out)

    assert_one_line_error(result, str(out), "No space left on device")
    assert _snapshot(tmp_path) == before


def test_full_disk_while_writing_a_rank_config_writes_nothing(
    tmp_path, analysis, run_cli, monkeypatch
):
    _full_disk(monkeypatch)

    result = run_cli("recommend", analysis, "--preset", "balanced", "-o", tmp_path / "r.json")

    assert_one_line_error(result, "r.json", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_is_one_line_and_writes_nothing(tmp_path, analysis, run_cli, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    else:
        folder.chmod(0o555)

    result = run_cli("recommend", analysis, "--preset", "balanced", "-o", folder / "r.json")

    folder.chmod(0o755)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "svdrank: error:" in result.stderr
    assert "r.json" in result.stderr
    assert list(folder.iterdir()) == []


def test_plot_failing_on_the_third_figure_leaves_no_new_folder(
    tmp_path, analysis, run_cli, monkeypatch
):
    real_savefig = Figure.savefig
    calls = []

    def fails_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", fails_third)
    before = _snapshot(tmp_path)

    result = run_cli("plot", analysis, "-o", tmp_path / "figures")

    assert_one_line_error(result, "No space left on device")
    assert len(calls) == 3
    assert not (tmp_path / "figures").exists()
    assert _snapshot(tmp_path) == before


def test_plot_failing_keeps_the_figures_already_there(tmp_path, analysis, run_cli, monkeypatch):
    figures = tmp_path / "figures"
    assert run_cli("plot", analysis, "-o", figures, "--html").exit_code == 0
    before = _snapshot(figures)
    real_savefig = Figure.savefig

    def fails_last(self, *args, **kwargs):
        if getattr(args[0], "name", None) is not None and _is_budget(self):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", fails_last)

    result = run_cli("plot", analysis, "-o", figures, "--html")

    assert_one_line_error(result, "No space left on device")
    assert _snapshot(figures) == before


def _is_budget(figure: Figure) -> bool:
    return any(ax.get_title().startswith("LoRA parameters") for ax in figure.axes)


def test_diff_plot_into_a_full_disk_writes_neither_the_analysis_nor_figures(
    tmp_path, run_cli, monkeypatch
):
    real_savefig = Figure.savefig

    def no_space(self, *args, **kwargs):
        real_savefig(self, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", no_space)

    result = run_cli("diff", BASE, TUNED, "-o", tmp_path / "a.json", "--plot", tmp_path / "figs")

    assert_one_line_error(result, "No space left on device", "a.json.resume", "--resume")
    # The results log keeps the layers: `--resume` writes the files without computing them.
    assert list(tmp_path.iterdir()) == [tmp_path / "a.json.resume"]
    monkeypatch.undo()
    calls = []
    real = pipeline.analyze_layer
    monkeypatch.setattr(pipeline, "analyze_layer", lambda *args: calls.append(1) or real(*args))

    result = run_cli("diff", BASE, TUNED, "-o", tmp_path / "a.json", "--resume", "-q")

    assert result.exit_code == 0, result.stderr
    assert calls == []
    assert [path.name for path in tmp_path.iterdir()] == ["a.json"]


def test_plot_into_an_existing_file_is_one_line(tmp_path, analysis, run_cli):
    target = tmp_path / "figures.png"
    target.write_bytes(b"not a folder")

    assert_one_line_error(run_cli("plot", analysis, "-o", target), str(target), "not a folder")
    assert target.read_bytes() == b"not a folder"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--alpha-ratio", "nan", "--format", "peft"), "--alpha-ratio"),
        (("--alpha-ratio", "-2", "--format", "peft"), "--alpha-ratio"),
        (("--alpha-ratio", "inf", "--format", "peft"), "--alpha-ratio"),
        (("--max-rank", "-1"), "--max-rank"),
        (("--max-rank", "0"), "--max-rank"),
        (("--min-rank", "-1"), "--min-rank"),
        (("--multiple-of", "0"), "--multiple-of"),
        (("--energy", "nan"), "energy"),
        (("--energy", "1.5"), "energy"),
        (("--threshold", "inf"), "--threshold"),
        (("--threshold", "-1"), "--threshold"),
        (("--sv-ratio", "nan"), "--sv-ratio"),
        (("--budget-ratio", "nan"), "--budget-ratio"),
        (("--budget", "-5"), "--budget"),
        (("--budget", "nan"), "--budget"),
    ],
)
def test_recommend_options_out_of_range_are_one_line(tmp_path, analysis, run_cli, args, words):
    result = run_cli("recommend", analysis, "-o", tmp_path / "r.json", *args)

    assert_one_line_error(result, words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--seed", "-1"), "--seed"),
        (("--workers", "0"), "--workers"),
        (("--oversample", "-1"), "--oversample"),
        (("--power-iters", "-1"), "--power-iters"),
        (("--max-energy", "0"), "--max-energy"),
        (("--max-energy", "nan"), "--max-energy"),
        (("--max-energy", "1.5"), "--max-energy"),
    ],
)
def test_diff_options_out_of_range_are_one_line(tmp_path, run_cli, args, words):
    result = run_cli("diff", BASE, TUNED, "-o", tmp_path / "a.json", *args)

    assert_one_line_error(result, words)
    assert list(tmp_path.iterdir()) == []


def test_check_negative_max_rank_is_one_line(tmp_path, analysis, run_cli):
    config = tmp_path / "r.json"
    assert run_cli("recommend", analysis, "--preset", "balanced", "-o", config).exit_code == 0

    assert_one_line_error(run_cli("check", config, "--max-rank", "-1"), "--max-rank")


def test_peft_json_is_strict_json(tmp_path, analysis, run_cli):
    result = run_cli("recommend", analysis, "--format", "peft", "--alpha-ratio", "1.5")

    assert result.exit_code == 0
    record = json.loads(result.stdout, parse_constant=_refuse)
    assert record["lora_alpha"] == 1.5 * record["r"]


def _refuse(name: str):
    raise AssertionError(f"{name} in JSON output")


def test_unexpected_exception_is_one_line_exit_3(tmp_path, analysis, run_cli, monkeypatch):
    from svdrank.outputs import formats

    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nspanning lines")

    monkeypatch.setattr(formats, "ranks_record", broken)
    monkeypatch.delenv("SVDRANK_DEBUG", raising=False)

    result = run_cli("recommend", analysis, "--preset", "balanced", "--format", "json")

    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("svdrank: internal error: RuntimeError: a bug spanning lines")
    assert "SVDRANK_DEBUG=1" in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_variable_lets_the_traceback_through(analysis, run_cli, monkeypatch):
    from svdrank.outputs import formats

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(formats, "ranks_record", broken)
    monkeypatch.setenv("SVDRANK_DEBUG", "1")

    result = run_cli("recommend", analysis, "--preset", "balanced", "--format", "json")

    assert isinstance(result.exception, RuntimeError)


def test_write_files_atomically_leaves_no_temporary_file(tmp_path):
    from svdrank.errors import OutputError
    from svdrank.files import write_files_atomically

    def fails(stream):
        stream.write(b"half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OutputError, match="Input/output error"):
        write_files_atomically({tmp_path / "a": lambda s: s.write(b"whole"), tmp_path / "b": fails})

    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)
