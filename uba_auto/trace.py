r"""Stochastic trace estimation: Hutchinson and Hutch++ on a symmetric operator.

Both use only products :math:`A z`, so the trace of a network's Hessian costs a fixed number of
Hessian-vector products. Hutch++ (Meyer, Musco, Musco & Woodruff, 2021) spends a third of its budget
on a sketch of the dominant subspace, whose trace it computes exactly; its error then decays like
:math:`1/m` rather than Hutchinson's :math:`1/\sqrt{m}` when the spectrum decays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from uba_auto._validation import check_int, check_operator, resolve_generator
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace"]

_DISTRIBUTIONS = ("rademacher", "gaussian")

# Probes go through op.matmat in blocks: one batched product for dense operators, while the
# (n, block) probe matrix stays small for operators of millions of parameters.
_BLOCK = 8


@dataclass(frozen=True)
class TraceEstimate:
    r"""A stochastic trace estimate and its spread.

    Attributes:
        estimate: the trace estimate.
        std_error: standard error of the stochastic part,
            :math:`\mathrm{std}(\text{samples}) / \sqrt{\text{len(samples)}}` (sample standard
            deviation, ``nan`` with a single sample). For Hutch++ this is the error of the
            deflated remainder only; the low-rank part is exact given the sketch, so it is the
            error of :attr:`estimate` conditioned on the sketch.
        samples: per-probe values :math:`z_i^\top A z_i` of the stochastic part (for Hutch++ with
            the deflated probes), float64 CPU.
        num_matvecs: products with the operator spent by this call.
        method: ``"hutchinson"`` or ``"hutch++"``.
        low_rank_trace: Hutch++ only: the exact part :math:`\operatorname{tr}(Q^\top A Q)`;
            ``0.0`` for Hutchinson.
    """

    estimate: float
    std_error: float
    samples: Tensor
    num_matvecs: int
    method: str
    low_rank_trace: float = 0.0


def _probes(
    n: int, count: int, distribution: str, generator: torch.Generator, op: SymmetricOperator
) -> Tensor:
    """``(n, count)`` probe vectors with :math:`E[z z^\\top] = I`."""
    if distribution == "rademacher":
        # Drawn in the operator's dtype: an int64 intermediate would take 8 bytes per entry.
        signs = torch.randint(
            0, 2, (n, count), generator=generator, dtype=op.dtype, device=op.device
        )
        return signs.mul_(2).sub_(1)
    return torch.randn(n, count, generator=generator, dtype=op.dtype, device=op.device)


def _quadratic_forms(op: SymmetricOperator, z: Tensor) -> Tensor:
    """The values :math:`z_j^\\top A z_j` for the columns of ``z``, on the device."""
    return (z * op.matmat(z).detach()).sum(dim=0)


def _summarise(samples: Tensor) -> tuple[float, float]:
    count = samples.numel()
    mean = float(samples.mean())
    std_error = float(samples.std(correction=1)) / math.sqrt(count) if count > 1 else math.nan
    return mean, std_error


def hutchinson_trace(
    op: SymmetricOperator,
    *,
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
) -> TraceEstimate:
    r"""Hutchinson's trace estimator.

    .. math::

        \operatorname{tr}(A) \approx \frac{1}{s} \sum_{i=1}^{s} z_i^\top A z_i, \qquad
        \mathbb{E}[z z^\top] = I,

    which is unbiased, with variance :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)/s` for Rademacher
    probes and :math:`2\|A\|_F^2/s` for Gaussian ones.

    Args:
        op: the symmetric operator.
        num_samples: number of probes (= products). The default 100 matches PyHessian's cap.
        generator: a ``torch.Generator`` on the operator's device; ``None`` uses a fresh one
            seeded with 0 (reproducible, global RNG untouched).
        distribution: ``"rademacher"`` (random signs, lower variance) or ``"gaussian"``.

    Returns:
        A :class:`TraceEstimate` with ``method="hutchinson"``.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> import torch
        >>> from uba_auto.linear_operator import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> hutchinson_trace(op, num_samples=4).estimate  # exact: z^T D z = tr(D) for signs z
        6.0
    """
    op = check_operator(op)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    if not isinstance(distribution, str) or distribution not in _DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    generator = resolve_generator(generator, op)

    start_count = op.num_matvecs
    values = []
    for first in range(0, num_samples, _BLOCK):
        count = min(_BLOCK, num_samples - first)
        values.append(_quadratic_forms(op, _probes(op.size, count, distribution, generator, op)))
    samples = torch.cat(values).to("cpu", torch.float64)
    estimate, std_error = _summarise(samples)
    return TraceEstimate(
        estimate=estimate,
        std_error=std_error,
        samples=samples,
        num_matvecs=op.num_matvecs - start_count,
        method="hutchinson",
    )


def hutchpp_trace(
    op: SymmetricOperator,
    *,
    num_matvecs: int = 99,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    r"""Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff, 2021).

    With a budget of :math:`m` products: sketch :math:`S \in \{\pm 1\}^{n \times m/3}`, take an
    orthonormal basis :math:`Q` of :math:`AS`, and estimate

    .. math::

        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
            + \frac{1}{p} \sum_{i=1}^{p} g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i,

    with :math:`p \approx m/3` Rademacher probes :math:`g_i`. The first term is exact; the second
    is Hutchinson on the deflated operator, whose Frobenius norm is small when the spectrum decays.
    If ``A`` has rank below ``m // 3``, the sketch captures its range and the estimate is exact
    up to rounding.

    Args:
        op: the symmetric operator.
        num_matvecs: total budget :math:`m \ge 3`: ``m // 3`` products for the sketch, as many for
            :math:`AQ` (fewer if ``n`` is smaller), the rest for the deflated probes.
        generator: a ``torch.Generator`` on the operator's device; ``None`` uses a fresh one
            seeded with 0.

    Returns:
        A :class:`TraceEstimate` with ``method="hutch++"``; its ``std_error`` and ``samples``
        describe the deflated Hutchinson part.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> import torch
        >>> from uba_auto.linear_operator import DenseOperator
        >>> u = torch.ones(10, 1, dtype=torch.float64)
        >>> op = DenseOperator(u @ u.T)  # rank 1, trace 10
        >>> round(hutchpp_trace(op, num_matvecs=9).estimate, 10)
        10.0
    """
    op = check_operator(op)
    num_matvecs = check_int(
        "num_matvecs",
        num_matvecs,
        minimum=3,
        hint="; Hutch++ splits its budget in three parts, use hutchinson_trace for fewer",
    )
    generator = resolve_generator(generator, op)

    start_count = op.num_matvecs
    sketch_size = num_matvecs // 3
    sketch = _probes(op.size, sketch_size, "rademacher", generator, op)
    # Reduced QR: Q is orthonormal even when A S is rank deficient (then some columns of Q span
    # directions outside range(A), which is harmless: the split of the trace stays exact).
    q, _ = torch.linalg.qr(op.matmat(sketch).detach())
    low_rank_trace = float(_quadratic_forms(op, q).sum())
    num_probes = num_matvecs - sketch_size - q.shape[1]
    g = _probes(op.size, num_probes, "rademacher", generator, op)
    g = g - q @ (q.T @ g)
    values = [
        _quadratic_forms(op, g[:, first : first + _BLOCK]) for first in range(0, num_probes, _BLOCK)
    ]
    samples = torch.cat(values).to("cpu", torch.float64)
    residual_mean, std_error = _summarise(samples)
    return TraceEstimate(
        estimate=low_rank_trace + residual_mean,
        std_error=std_error,
        samples=samples,
        num_matvecs=op.num_matvecs - start_count,
        method="hutch++",
        low_rank_trace=low_rank_trace,
    )
