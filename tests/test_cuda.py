"""The probe and auto_uba on a CUDA device, against dense float64 ground truth computed on the CPU.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. The models and batches are the CPU tests' seeded problems
moved to ``cuda``, so the dense reference is the same one ``test_probe.py`` uses.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _models import PROBLEMS, SEPARABLE, make_problem
from _reference import F64, _Reference
from _state_checks import assert_state_unchanged, snapshot_state
from torch import nn

from uba_auto import auto_uba, probe_curvature
from uba_auto._batches import move_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REL = 1e-4
CUDA = torch.device("cuda")


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def on_cuda(name: str, **kwargs):
    """The CPU problem, its dense float64 eigenvalues (on the CPU), and a CUDA copy of both."""
    problem = make_problem(name, **kwargs)
    ref = _Reference(problem, problem.batches, "train-deterministic")
    model = copy.deepcopy(problem.model).to(CUDA)
    batches = [move_batch(b, CUDA) for b in problem.batches]
    return problem, ref, model, batches


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_extremes_on_cuda_match_dense_cpu_hessian(name):
    problem, ref, model, batches = on_cuda(name)
    ev = torch.linalg.eigvalsh(ref.hessian())
    est = probe_curvature(model, batches, problem.loss, num_batches=3, dtype=F64)
    assert est.device.startswith("cuda") and est.dtype == "float64"
    assert rel_err(est.lambda_max, float(ev[-1])) <= REL
    assert rel_err(est.lambda_min, float(ev[0])) <= REL


@pytest.mark.parametrize("name", SEPARABLE)
def test_ggn_on_cuda_matches_dense_cpu_ggn(name):
    problem, ref, model, batches = on_cuda(name)
    ev = torch.linalg.eigvalsh(ref.ggn())
    est = probe_curvature(model, batches, problem.loss, num_batches=3, dtype=F64, curvature="ggn")
    assert rel_err(est.lambda_max, float(ev[-1])) <= REL


def test_float32_probe_on_cuda_is_close():
    problem, ref, model, batches = on_cuda("tanh_mlp")
    ev = torch.linalg.eigvalsh(ref.hessian())
    est = probe_curvature(model, batches, problem.loss, num_batches=3)
    assert est.dtype == "float32"
    assert rel_err(est.lambda_max, float(ev[-1])) <= 1e-3


def test_basis_on_cpu_gives_the_same_eigenvalues():
    problem, _, model, batches = on_cuda("cnn_batchnorm")
    kw = dict(num_batches=3, dtype=F64, trace=False, per_batch=False, seed=3)
    on_gpu = probe_curvature(model, batches, problem.loss, **kw)
    on_cpu = probe_curvature(model, batches, problem.loss, basis_device="cpu", **kw)
    assert rel_err(on_cpu.lambda_max, on_gpu.lambda_max) <= 1e-10
    assert rel_err(on_cpu.lambda_min, on_gpu.lambda_min) <= 1e-10


def test_probe_leaves_cuda_model_optimizer_and_rng_bit_identical():
    problem, _, model, batches = on_cuda("cnn_batchnorm")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batches[0]
    problem.loss(model(x), y).backward()
    optimizer.step()
    model.conv.bias.grad = None
    torch.cuda.manual_seed(7)
    snap = snapshot_state(model, optimizer)
    assert snap.cuda_rng_states is not None
    probe_curvature(model, batches, problem.loss, num_batches=3, density=True, seed=5)
    assert_state_unchanged(model, snap, optimizer)


def test_pyhessian_backend_on_cuda_agrees_with_lanczos():
    problem, ref, model, batches = on_cuda("logistic_regression")
    ev = torch.linalg.eigvalsh(ref.hessian())
    est = probe_curvature(
        model, batches, problem.loss, num_batches=3, method="pyhessian", trace=False
    )
    assert est.device.startswith("cuda")
    assert rel_err(est.lambda_max, float(ev[-1])) <= 1e-2


def test_auto_uba_drives_training_on_cuda_to_lr_min():
    problem, _, model, batches = on_cuda("tanh_mlp", num_batches=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    auto = auto_uba(model, batches, 30, optimizer=opt, progress=False)
    assert auto.report.estimate.device.startswith("cuda")
    assert math.isfinite(auto.phi)
    used = []
    for i in range(30):
        x, y = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        auto.scheduler.step()
    assert used[0] == pytest.approx(0.05) and used[-1] == 0.0
