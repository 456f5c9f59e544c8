"""Symmetric linear operators: the interface every eigen- and trace-solver of uba-auto acts on.

Solvers never see a model. They see an object that multiplies flat vectors, so a test can hand
them a plain matrix with a known spectrum, and the Hessian of a network plugs in through the same
door.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

__all__ = ["DenseOperator", "SymmetricOperator"]


class SymmetricOperator(abc.ABC):
    r"""A symmetric linear map :math:`A: \mathbb{R}^n \to \mathbb{R}^n` on flat 1-D tensors.

    Subclasses implement :meth:`_matvec` and set :attr:`size`, :attr:`dtype` and :attr:`device`.
    The public :meth:`matvec` checks its input and counts products in :attr:`num_matvecs`, so solver
    results can report the work they did.

    Attributes:
        size: the dimension ``n``.
        dtype: floating dtype of the vectors the operator accepts and returns.
        device: device of those vectors.
        num_matvecs: products computed since construction (or the last :meth:`reset_count`).
    """

    size: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self) -> None:
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @abc.abstractmethod
    def _matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for a 1-D tensor ``v`` of length :attr:`size` (already checked)."""

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v``.

        Args:
            v: a 1-D tensor of length :attr:`size`, on :attr:`device`, of dtype :attr:`dtype`.

        Raises:
            ValueError: if ``v`` has the wrong shape, dtype or device.
        """
        if not isinstance(v, Tensor):
            raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
        if v.shape != (self.size,):
            raise ValueError(
                f"v must have shape ({self.size},), got {tuple(v.shape)}; flatten it first"
            )
        if v.dtype != self.dtype or v.device != self.device:
            raise ValueError(
                f"v must be {self.dtype} on {self.device}, got {v.dtype} on {v.device}; "
                f"use v.to(device=op.device, dtype=op.dtype)"
            )
        self.num_matvecs += 1
        return self._matvec(v)

    def matmat(self, m: Tensor) -> Tensor:
        """Return ``A @ m`` for a 2-D tensor ``m`` of shape ``(size, k)``, column by column."""
        if m.ndim != 2 or m.shape[0] != self.size:
            raise ValueError(f"m must have shape ({self.size}, k), got {tuple(m.shape)}")
        return torch.stack([self.matvec(m[:, j]) for j in range(m.shape[1])], dim=1)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def reset_count(self) -> None:
        """Set :attr:`num_matvecs` back to zero."""
        self.num_matvecs = 0

    def to_dense(self) -> Tensor:
        """The ``(size, size)`` matrix, by ``size`` products with the unit vectors (for tests)."""
        return self.matmat(torch.eye(self.size, dtype=self.dtype, device=self.device))


class DenseOperator(SymmetricOperator):
    """A symmetric operator backed by an explicit matrix.

    Args:
        matrix: a square, symmetric, floating-point 2-D tensor.
        check_symmetric: verify symmetry to a relative tolerance of ``1e-6`` (float32) or ``1e-12``
            (float64) of the largest entry.

    Example:
        >>> import torch
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
        >>> op.matvec(torch.ones(2, dtype=torch.float64)).tolist()
        [1.0, 3.0]
    """

    def __init__(self, matrix: Tensor, *, check_symmetric: bool = True) -> None:
        super().__init__()
        if not isinstance(matrix, Tensor):
            raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square 2-D, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise TypeError(
                f"matrix must be floating point, got {matrix.dtype}; use matrix.double()"
            )
        if check_symmetric and matrix.numel() > 0:
            tol = 1e-12 if matrix.dtype == torch.float64 else 1e-6
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = (matrix - matrix.T).abs().max() / scale
            if asym > tol:
                raise ValueError(
                    "matrix must be symmetric; "
                    f"max |A - A.T| / max |A| = {float(asym):.3g} > {tol}. "
                    "Symmetrise it with (A + A.T) / 2 if that is what you mean"
                )
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def matmat(self, m: Tensor) -> Tensor:
        if m.ndim != 2 or m.shape[0] != self.size:
            raise ValueError(f"m must have shape ({self.size}, k), got {tuple(m.shape)}")
        self.num_matvecs += m.shape[1]
        return self.matrix @ m
