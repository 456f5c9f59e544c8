"""The measuring parts of ``benchmarks/probe_benchmark.py``: the oracle count, the recorder that
rebuilds each library's estimate from the vectors it multiplies, and (where the peers are
installed: the ``bench`` extra) that every contender multiplies by the same Hessian and reaches
1e-3 of the dense truth on a tiny model."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/

from benchmarks import probe_benchmark as pb
from uba_auto import DenseOperator, SymmetricOperator, lanczos


def test_first_within_is_the_start_of_the_final_run_inside_the_band():
    truth = 1.0
    est = [0.5, 1.0, 0.9, 0.9995, 1.0002, 1.0]
    assert pb.first_within(est, truth) == 4
    assert pb.first_within([*est, 0.9], truth) is None
    assert pb.first_within([], truth) is None


def _spectrum_operator(n: int = 60) -> DenseOperator:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)
    return DenseOperator(q @ torch.diag(values) @ q.T)


class _Observed(SymmetricOperator):
    def __init__(self, inner: SymmetricOperator, rec: pb.Recorder) -> None:
        super().__init__()
        self.inner, self.rec = inner, rec
        self.size, self.dtype, self.device = inner.size, inner.dtype, inner.device

    def _matvec(self, v):
        av = self.inner.matvec(v)
        self.rec.observe(v, av)
        return av


def test_recorder_rebuilds_the_lanczos_ritz_values_and_stops_once_settled():
    op = _spectrum_operator()
    rec = pb.Recorder("lanczos", 3.0, -1.0, cap=60, device=op.device)
    rec.start()
    with pytest.raises(pb._Enough):
        lanczos(_Observed(op, rec), max_iters=60, tol=1e-14)
    traj = rec.traj
    k = traj.oracle(3.0, -1.0, both=True)
    assert k is not None and len(traj.est_max) == k + 3  # 3 products past the oracle count
    # The same run, stopped at the oracle count, gives the same extreme Ritz values.
    res = lanczos(op, max_iters=k, tol=1e-14)
    assert traj.est_max[k - 1] == pytest.approx(res.lambda_max, rel=1e-10)
    assert traj.est_min[k - 1] == pytest.approx(res.lambda_min, rel=1e-10)
    assert abs(res.lambda_max - 3.0) <= pb.REL * 3.0
    assert traj.times == sorted(traj.times)


def test_power_recorder_holds_for_as_many_products_again():
    op = DenseOperator(torch.diag(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)))
    rec = pb.Recorder("power", 1.0, 0.1, cap=500, device=op.device)
    v = torch.ones(3, dtype=torch.float64)
    with pytest.raises(pb._Enough):
        for _ in range(500):
            av = op.matvec(v)
            rec.observe(v, av)
            v = av / av.norm()
    k = rec.traj.oracle(1.0, 0.1, both=False)
    assert len(rec.traj.est_max) == k + max(10, k)


def _bn_problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 36, 10)
    )
    return model, (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))


def _mlp_problem():
    # Seeded so that λ_max (1.10) leads |λ_min| (0.87): power iteration converges to it.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 10))
    return model, (3 * torch.randn(32, 8), torch.randint(0, 10, (32,)))


def _dense_spectrum(model, batch):
    """Eigenvalues of the float64 Hessian, reverse-over-reverse (torch.func's forward-over-reverse
    is off through BatchNorm), with BatchNorm on batch statistics."""
    replica = copy.deepcopy(model).double().train()
    params = dict(replica.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = [(k, p.shape, p.numel()) for k, p in params.items()]

    def loss_of(theta):
        parts, i = {}, 0
        for k, shape, n in shapes:
            parts[k] = theta[i : i + n].view(shape)
            i += n
        out = torch.func.functional_call(replica, parts, (batch[0].double(),))
        return pb.loss_fn(out, batch[1])

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))


@pytest.fixture
def _peers_installed():
    for module in ("pyhessian", "curvlinops", "hessian_eigenthings"):
        pytest.importorskip(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", pb.PEERS)
@pytest.mark.usefixtures("_peers_installed")
def test_peers_multiply_by_our_hessian_with_batchnorm_on_batch_statistics(name):
    model, batch = _bn_problem()
    device = torch.device("cpu")
    ours, peer = pb.Ours(model, batch, device), pb.CONTENDERS[name](model, batch, device)
    (our_fn, our_flat), (fn, to_flat) = ours.product(), peer.product()
    reference = our_flat(our_fn()).double()
    diff = float((to_flat(fn()).double() - reference).norm() / reference.norm())
    # curvlinops' jvp-over-jacrev through BatchNorm is off (PyTorch 2.13): about 1 %.
    assert diff < (0.1 if name == "curvlinops-eigsh" else 1e-5)


@pytest.mark.parametrize("name", pb.METHODS)
@pytest.mark.usefixtures("_peers_installed")
def test_contenders_reach_the_dense_truth_at_their_oracle_count(name):
    model, batch = _mlp_problem()
    dense = _dense_spectrum(model, batch)
    lam_max, lam_min = float(dense[-1]), float(dense[0])
    assert lam_max > abs(lam_min)
    truth = {"lambda_max": lam_max, "lambda_min": lam_min}
    c = pb.CONTENDERS[name](model, batch, torch.device("cpu"))
    if isinstance(c, pb.CurvlinopsEigsh):
        for both in (False, True):
            s, tried = c.search(0, both, truth, hint=20)
            assert s is not None and any(t["reached"] for t in tried)
        return
    traj = c.trajectory(0, pb.Recorder(c.kind, lam_max, lam_min, cap=300, device=c.device))
    for both in (False, True) if c.both_ends else (False,):
        k = traj.oracle(lam_max, lam_min, both)
        assert k is not None
        s = c.capped(0, k, both=both)
        assert s.products == max(k, 2 if name == pb.OURS else 1)
        assert abs(s.lambda_max - lam_max) <= pb.REL * lam_max
        if both:
            assert abs(s.lambda_min - lam_min) <= pb.REL * abs(lam_min)
