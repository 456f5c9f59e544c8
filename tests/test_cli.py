"""The command line, end to end in a subprocess: exit codes, files, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uba_auto", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_help_lists_commands():
    res = run("--help")
    assert res.returncode == 0
    assert "plot" in res.stdout and "usage: uba-auto" in res.stdout


def test_no_command_prints_help():
    res = run()
    assert res.returncode == 0 and "usage: uba-auto" in res.stdout


def test_version():
    from uba_auto import __version__

    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"uba-auto {__version__}"


def test_plot_writes_png(tmp_path):
    out = tmp_path / "sub" / "family.png"
    res = run("plot", "--phi", "0.5", "1", "2", "4", "--warmup", "50", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {out}" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["plot", "--phi", "-1", "--out", "x.png"], "--phi values must be finite and > 0"),
        (["plot", "--phi", "nan", "--out", "x.png"], "--phi values must be finite and > 0"),
        (["plot", "--phi", "abc", "--out", "x.png"], "invalid float value: 'abc'"),
        (["plot", "--out", "x.txt"], "--out must end in .png, .pdf or .svg"),
        (["plot", "--phi", "1"], "the following arguments are required: --out"),
        (["plot", "--warmup", "5000", "--out", "x.png"], "--warmup must lie in [0, --total-steps)"),
        (["plot", "--total-steps", "0", "--out", "x.png"], "--total-steps must be >= 1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert message in lines[0]
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []
