"""The command line, end to end in a subprocess: exit codes, files, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uba_auto import cli


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uba_auto", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,  # guards against a hang, not speed: a loaded CI machine is slow
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


def test_python_m_uba_auto_cli_is_the_same_command():
    from uba_auto import __version__

    res = subprocess.run(
        [sys.executable, "-m", "uba_auto.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=900,  # guards against a hang, not speed: a loaded CI machine is slow
    )
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
def test_bad_arguments_exit_2_with_one_line(capsys, monkeypatch, tmp_path, args, message):
    # In this process for speed; test_bad_argument_in_a_subprocess checks a real process.
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, *args)
    assert_one_line_error(status, err, message)
    assert list(tmp_path.iterdir()) == []


def test_bad_argument_in_a_subprocess(tmp_path):
    res = run("plot", "--phi", "-1", "--out", "x.png", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "--phi values must be finite and > 0" in lines[0]
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- demo, report
REPO = Path(__file__).resolve().parent.parent
FACTORIES = "tests._cli_factories"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (faster than a subprocess for checks that stop before any work)."""
    try:
        status = cli.main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, message: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, as a user runs from their project; sys.path restored."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_demo_help_via_python_m():
    res = run("demo", "--help")
    assert res.returncode == 0, res.stderr
    for flag in ("--budget", "--seed", "--device", "--out", "--quick", "--phi"):
        assert flag in res.stdout


def test_demo_quick_writes_files_and_prints_table(tmp_path):
    out = tmp_path / "demo"
    res = run("demo", "--quick", "--phi", "0.5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "uba-auto curvature report" in res.stdout
    for text in ("schedule", "held-out loss", "cosine", "UBA auto φ=", "UBA φ=0.5", "probe:"):
        assert text in res.stdout
    assert f"into {out}" in res.stdout
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "curvature_report.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert results["report"] == report
    assert [r["name"] for r in results["runs"]] == ["auto", "cosine", "phi=0.5"]
    assert results["runs"][0]["phi"] == pytest.approx(report["phi"])
    assert all(len(r["curve_steps"]) == 10 for r in results["runs"])
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [r["name"] for r in rows] == ["auto", "cosine", "phi=0.5"]
    assert float(rows[1]["final_heldout_loss"]) == pytest.approx(
        results["runs"][1]["final_heldout_loss"]
    )


def test_report_end_to_end(tmp_path):
    json_path, plot_path = tmp_path / "out" / "report.json", tmp_path / "out" / "report.png"
    res = run(
        "report",
        "--model", f"{FACTORIES}:make_model",
        "--data", f"{FACTORIES}:make_loader",
        "--loss", "cross_entropy",
        "--budget", "500",
        "--batches", "2",
        "--json", str(json_path),
        "--plot", str(plot_path),
        cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "uba-auto curvature report  (budget 500 steps" in res.stdout
    data = json.loads(json_path.read_text())
    assert json.loads(json.dumps(data)) == data
    assert f"phi={data['phi']:.4g})" in res.stdout  # the "use it:" line
    assert data["budget"] == 500 and data["estimate"]["num_batches"] == 2
    assert plot_path.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {json_path}" in res.stdout and f"wrote {plot_path}" in res.stdout


@pytest.mark.parametrize(
    "data,loss,expected",
    [
        ("make_data", "auto", "! loss guessed: cross_entropy (integer targets of shape (16,)"),
        ("make_regression_data", "auto", "! loss guessed: mse_loss"),
        ("make_regression_data", "mse", ""),
        ("make_regression_data", "huber", ""),
        ("make_regression_data", "l1", ""),
        ("make_regression_data", f"{FACTORIES}:half_mse", ""),
    ],
)
def test_report_losses(capsys, in_repo, data, loss, expected):
    status, out, err = run_main(
        capsys,
        "report",
        "--model", f"{FACTORIES}:make_model",
        "--data", f"{FACTORIES}:{data}",
        "--loss", loss,
        "--budget", "100",
        "--batches", "2",
    )  # fmt: skip
    assert status == 0, err
    assert "φ chosen" in out and "use it: UBAScheduler(optimizer, total_steps=99, phi=" in out
    assert expected in out


GOOD = ["--model", f"{FACTORIES}:make_model", "--data", f"{FACTORIES}:make_data"]


def report_args(*args: str, budget: str = "100") -> list[str]:
    """A ``report`` command line: the good factories, then ``args`` (later flags win)."""
    return ["report", *GOOD, "--budget", budget, "--batches", "2", *args]


@pytest.mark.parametrize(
    "args,message",
    [
        (report_args("--model", "nocolon"), "--model must have the form PKG.MODULE:NAME"),
        (report_args("--data", "a.b:"), "--data must have the form PKG.MODULE:NAME"),
        (
            report_args("--model", "no_such_module_xyz:make"),
            "cannot import module 'no_such_module_xyz' (ModuleNotFoundError: No module named",
        ),
        (report_args("--model", f"{FACTORIES}:nope"), "has no attribute 'nope'"),
        (report_args("--model", f"{FACTORIES}:NOT_CALLABLE"), "must name a function"),
        (
            report_args("--model", f"{FACTORIES}:broken_factory"),
            "raised RuntimeError: out of coffee",
        ),
        (
            report_args("--model", f"{FACTORIES}:not_a_model"),
            "must return the model, a torch.nn.Module, got list, which looks like data: pass "
            "that factory as --data",
        ),
        (
            report_args("--model", f"{FACTORIES}:make_loader"),
            "must return the model, a torch.nn.Module, got DataLoader (torch.utils.data."
            "dataloader), which looks like data: pass that factory as --data",
        ),
        (
            report_args("--model", f"{FACTORIES}:model_and_optimizer"),
            "got tuple holding a Module: return the model alone",
        ),
        (
            report_args("--data", f"{FACTORIES}:model_as_data"),
            f"--data factory {FACTORIES}:model_as_data returned a model (Sequential "
            "(torch.nn.modules.container), a torch.nn.Module), not data: --data must name a "
            "function that returns the batches to probe",
        ),
        (
            report_args("--data", f"{FACTORIES}:dataset_data"),
            "returned a dataset (TensorDataset (torch.utils.data.dataset)), not batches: return "
            "torch.utils.data.DataLoader(dataset, batch_size=...) instead",
        ),
        (
            report_args("--data", f"{FACTORIES}:soft_label_data"),
            "loss_fn is required: the targets of the first batch (float, shape (16, 3)) are rows "
            "of probabilities",
        ),
        (report_args("--mode", "train"), "argument --mode: invalid choice: 'train'"),
        (
            report_args("--data", f"{FACTORIES}:not_a_loader"),
            "must return an iterable of batches (a DataLoader or a list of (inputs, targets) "
            "pairs), got int",
        ),
        (report_args("--data", f"{FACTORIES}:tensor_data"), "got Tensor"),
        (report_args("--data", f"{FACTORIES}:empty_data"), "loader yielded no batches"),
        (
            report_args("--data", f"{FACTORIES}:wrong_shape_data"),
            "the probe failed: RuntimeError",
        ),
        (
            report_args("--loss", "frobnicate"),
            "--loss must be one of auto, cross_entropy, nll, mse, l1, smooth_l1, huber, bce, "
            "bce_with_logits or PKG.MODULE:FN, got 'frobnicate'",
        ),
        (report_args("--loss", f"{FACTORIES}:NOT_CALLABLE"), "must name a callable loss"),
        (
            report_args("--loss", f"{FACTORIES}:key_error_loss"),
            "the probe failed: KeyError: 'label' (raised in the model, the data or the loss",
        ),
        (report_args("--seed", "-1"), "--seed must be >= 0, got -1"),
        (report_args(budget="0"), "--budget must be >= 2"),
        (report_args(budget="-5"), "--budget must be >= 2"),
        (report_args(budget="many"), "invalid int value: 'many'"),
        (report_args("--batches", "0"), "--batches must be >= 1"),
        (report_args("--warmup", "200"), "budget must be > warmup_steps + 1"),  # from auto_uba
        (report_args("--peak-lr", "-1"), "--peak-lr must be finite and > 0"),
        (report_args("--json", "report.txt"), "--json must end in .json"),
        (report_args("--plot", "report.json"), "--plot must end in .png, .pdf or .svg"),
        (report_args("--device", "tpu"), "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["report", "--budget", "10"], "the following arguments are required: --model, --data"),
    ],
)
def test_report_bad_arguments_one_line(capsys, in_repo, args, message):
    status, out, err = run_main(capsys, *args)
    assert_one_line_error(status, err, message)
    assert "wrote" not in out


def test_report_module_that_fails_to_import(capsys, in_repo, tmp_path, monkeypatch):
    (tmp_path / "cli_missing_dep.py").write_text("import not_a_module_anyone_has\n")
    (tmp_path / "cli_raises.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)  # the current folder is put on sys.path, as python -m does
    status, _, err = run_main(capsys, *report_args("--model", "cli_missing_dep:make"))
    assert_one_line_error(
        status,
        err,
        "cannot import module 'cli_missing_dep' (ModuleNotFoundError: No module named "
        "'not_a_module_anyone_has')",
    )
    status, _, err = run_main(capsys, *report_args("--data", "cli_raises:make"))
    assert_one_line_error(
        status, err, "importing module 'cli_raises' raised ZeroDivisionError: division by zero"
    )


def test_report_output_folder_not_writable(capsys, in_repo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for flag, name in (("--json", "r.json"), ("--plot", "r.png")):
        status, out, err = run_main(capsys, *report_args(flag, str(blocker / "sub" / name)))
        assert_one_line_error(status, err, f"{flag}: cannot write into")
        assert "is a file, not a folder" in err and "φ chosen" not in out


@NO_CUDA
@pytest.mark.parametrize("command", [["demo", "--quick"], report_args()])
def test_device_cuda_without_cuda(capsys, in_repo, command):
    status, _, err = run_main(capsys, *command, "--device", "cuda")
    assert_one_line_error(status, err, "--device 'cuda' asks for CUDA, but CUDA is not available")


@NO_CUDA
def test_demo_device_cuda_without_cuda_subprocess(tmp_path):
    res = run("demo", "--device", "cuda", "--out", str(tmp_path / "demo"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "CUDA is not available" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "1"], "--budget must be >= 2"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--phi", "-1"], "--phi values must be finite and > 0"),
        (["--phi", "inf"], "--phi values must be finite and > 0"),
        (["--device", "gpu"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["--budget", "x"], "invalid int value: 'x'"),
    ],
)
def test_demo_bad_arguments_one_line(capsys, tmp_path, args, message):
    status, _, err = run_main(capsys, "demo", "--out", str(tmp_path / "demo"), *args)
    assert_one_line_error(status, err, message)
    assert list(tmp_path.iterdir()) == []


def test_demo_out_is_a_file(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, _, err = run_main(capsys, "demo", "--quick", "--out", str(blocker))
    assert_one_line_error(status, err, "--out: cannot write into")


def test_demo_without_scikit_learn(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    status, _, err = run_main(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert_one_line_error(
        status,
        err,
        "the demo needs scikit-learn, which is not installed; install with: pip "
        'install "uba-auto[demo]"',
    )
    assert list(tmp_path.iterdir()) == []


def test_report_mode_reaches_the_probe(capsys, in_repo, tmp_path):
    # A layer random in training mode that no mode policy can switch off while it keeps
    # BatchNorm on batch statistics: the default refuses, naming the flag; --mode eval probes.
    noisy = ["--model", f"{FACTORIES}:make_noisy_batchnorm_model"]
    status, _, err = run_main(capsys, *report_args(*noisy))
    assert_one_line_error(status, err, "random numbers")
    assert "(on the command line: mode= is --mode)" in err
    json_path = tmp_path / "report.json"
    status, out, err = run_main(
        capsys, *report_args(*noisy, "--mode", "eval", "--json", str(json_path))
    )
    assert status == 0, err
    assert "φ chosen" in out
    assert json.loads(json_path.read_text())["estimate"]["mode"] == "eval"


def test_report_help_lists_modes():
    res = run("report", "--help")
    assert res.returncode == 0, res.stderr
    assert "--mode {train-deterministic,eval,as-is}" in res.stdout
