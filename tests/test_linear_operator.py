"""DenseOperator and the SymmetricOperator contract the solvers rely on."""

from __future__ import annotations

import pytest
import torch

from uba_auto import DenseOperator


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T


def test_matvec_matmat_and_counting():
    a = spd(5)
    op = DenseOperator(a)
    v = torch.ones(5, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), a @ v)
    m = torch.eye(5, dtype=torch.float64)[:, :3]
    assert torch.allclose(op @ m, a[:, :3])
    assert op.num_matvecs == 4
    assert torch.equal(op.to_dense(), a)
    op.reset_count()
    assert op.num_matvecs == 0
    assert op.shape == (5, 5)


def test_checks():
    with pytest.raises(ValueError, match="must be symmetric"):
        DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="square 2-D"):
        DenseOperator(torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating point"):
        DenseOperator(torch.ones(2, 2, dtype=torch.int64))
    op = DenseOperator(spd(3))
    with pytest.raises(ValueError, match=r"v must have shape \(3,\)"):
        op.matvec(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="v must be torch.float64"):
        op.matvec(torch.ones(3, dtype=torch.float32))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        op.matvec([1.0, 2.0, 3.0])
