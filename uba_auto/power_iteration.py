r"""Power iteration for the dominant eigenvalue, as PyHessian computes it: the baseline for Lanczos.

Power iteration converges at the rate :math:`|\lambda_2 / \lambda_1|` per product, Lanczos at a rate
governed by :math:`\sqrt{(\lambda_1 - \lambda_2) / (\lambda_2 - \lambda_n)}`; on the small gaps of
Hessian spectra the difference is large, and this module exists so benchmarks can show it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from uba_auto._krylov import DEFAULT_CHECK_EVERY, gaussian_unit_vector
from uba_auto._validation import (
    check_int,
    check_operator,
    check_positive_finite,
    check_v0,
    resolve_generator,
)
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["PowerIterationResult", "power_iteration"]

# PyHessian's absolute floor in the denominator of its relative-change test (kept for parity).
_PYHESSIAN_FLOOR = 1e-6


@dataclass(frozen=True)
class PowerIterationResult:
    r"""Output of :func:`power_iteration`.

    Attributes:
        eigenvalue: the final Rayleigh quotient :math:`\theta = v^\top A v` (sign kept).
        eigenvector: the unit vector :math:`v` it was computed from (operator dtype and device).
        residual: :math:`\|A v - \theta v\|`, an upper bound on the distance from :math:`\theta`
            to the spectrum; unlike the stopping test it exposes a stalled iteration.
        converged: whether the relative-change test was met within ``max_iters``.
        num_matvecs: products with the operator spent by this call.
        num_iters: iterations run (one product each).
        history: the Rayleigh quotient at every iteration, float64 CPU, length ``num_iters``.
    """

    eigenvalue: float
    eigenvector: Tensor
    residual: float
    converged: bool
    num_matvecs: int
    num_iters: int
    history: Tensor


def power_iteration(
    op: SymmetricOperator,
    *,
    max_iters: int = 100,
    tol: float = 1e-4,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    check_every: int = DEFAULT_CHECK_EVERY,
) -> PowerIterationResult:
    r"""Dominant eigenvalue (largest :math:`|\lambda|`, sign kept) by power iteration.

    From a unit vector :math:`v_0`, iterate

    .. math::

        \theta_t = v_t^\top A v_t, \qquad v_{t+1} = \frac{A v_t}{\|A v_t\|},

    and stop, like PyHessian, when the relative change of the estimate is small:

    .. math::

        \frac{|\theta_t - \theta_{t-1}|}{|\theta_{t-1}| + 10^{-6}} < \mathrm{tol}.

    The test runs every ``check_every`` iterations (it syncs with the device), on the latest pair,
    so compared with PyHessian at most ``check_every - 1`` extra products are spent, and the
    returned estimate is the later, better one. Use ``check_every=1`` for exact parity.

    Args:
        op: the symmetric operator.
        max_iters: the most iterations (= products).
        tol: relative-change tolerance; PyHessian's default is ``1e-3``, ours ``1e-4``.
        v0: starting vector, shape ``(n,)``, operator dtype and device, nonzero. Default: a
            Gaussian vector from ``generator``.
        generator: a ``torch.Generator`` on the operator's device; ``None`` uses a fresh one
            seeded with 0. Ignored when ``v0`` is given.
        check_every: test the stopping rule every this many iterations.

    Returns:
        A :class:`PowerIterationResult`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Notes:
        The relative-change test can be met long before the estimate is accurate when the gap is
        small (the estimate creeps), and it is met at a wrong value when :math:`\lambda` and
        :math:`-\lambda` are both dominant (the Rayleigh quotient then settles between them). The
        :attr:`~PowerIterationResult.residual` reveals both; the floor :math:`10^{-6}` is absolute,
        as in PyHessian, so for operators with :math:`|\lambda| \lesssim 10^{-6}` it loosens the
        test. :func:`uba_auto.lanczos.lanczos` has none of these problems.

    Example:
        >>> import torch
        >>> from uba_auto.linear_operator import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, -10.0], dtype=torch.float64)))
        >>> result = power_iteration(op, tol=1e-10)
        >>> round(result.eigenvalue, 6), result.converged
        (-10.0, True)
    """
    op = check_operator(op)
    max_iters = check_int("max_iters", max_iters, minimum=1)
    tol = check_positive_finite("tol", tol, hint="; PyHessian uses 1e-3")
    check_every = check_int("check_every", check_every, minimum=1)
    v = check_v0(v0, op) if v0 is not None else None
    if v is None:
        v = gaussian_unit_vector(op, resolve_generator(generator, op))

    start_count = op.num_matvecs
    tiny = torch.finfo(op.dtype).tiny
    # Estimates stay on the device until a check, so iterations do not wait for the host.
    history = torch.empty(max_iters, dtype=op.dtype, device=op.device)
    converged = False
    num_iters = 0
    for t in range(max_iters):
        av = op.matvec(v).detach()  # no graph through the solver
        theta = torch.dot(v, av)
        history[t] = theta
        num_iters = t + 1
        if t >= 1 and (num_iters % check_every == 0 or num_iters == max_iters):
            prev, last = history[t - 1 : t + 1].to("cpu", torch.float64).tolist()
            if abs(last - prev) / (abs(prev) + _PYHESSIAN_FLOOR) < tol:
                converged = True
                break
        if t + 1 < max_iters:
            # A v = 0 (v in the null space) keeps v rather than dividing by zero; torch.where
            # decides on the device, without a host sync.
            norm = torch.linalg.vector_norm(av)
            v = torch.where(norm > 0, av / norm.clamp_min(tiny), v)

    residual = torch.linalg.vector_norm(av - theta * v)
    return PowerIterationResult(
        eigenvalue=float(theta),
        eigenvector=v,
        residual=float(residual),
        converged=converged,
        num_matvecs=op.num_matvecs - start_count,
        num_iters=num_iters,
        history=history[:num_iters].to("cpu", torch.float64),
    )
