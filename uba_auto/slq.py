r"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

For a unit probe :math:`v`, the spectral measure :math:`\mu_v = \sum_i (u_i^\top v)^2
\delta_{\lambda_i}` has Gauss quadrature nodes and weights given by :math:`m` Lanczos steps from
:math:`v`: the Ritz values :math:`\theta_j` and the squared first components :math:`\tau_j^2` of the
eigenvectors of :math:`T_m` (Golub & Meurant). Averaged over random probes, this estimates the
eigenvalue distribution :math:`\frac{1}{n} \sum_i \delta_{\lambda_i}` (Ubaru, Chen & Saad, 2017;
Ghorbani, Krishnan & Xiao, 2019).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from uba_auto._krylov import DEFAULT_CHECK_EVERY, run_lanczos, tridiagonal_eigh
from uba_auto._validation import (
    check_basis_device,
    check_int,
    check_operator,
    check_positive_finite,
    resolve_generator,
)
from uba_auto.linear_operator import SymmetricOperator

__all__ = ["SpectralDensity", "slq_density"]

# Default Gaussian broadening as a fraction of the spread of the nodes: narrow enough to keep the
# features of the bulk, wide enough to merge the m nodes of one probe into a smooth curve.
_DEFAULT_SIGMA_FRACTION = 0.01


@dataclass(frozen=True)
class SpectralDensity:
    r"""Quadrature rules estimating the eigenvalue distribution of an operator.

    Attributes:
        nodes: ``(num_probes, m)`` float64 CPU: the Ritz values of each probe's :math:`T`,
            ascending. A probe whose Lanczos run broke down early (its Krylov space was invariant:
            the rule is then exact) has fewer real nodes; its row is padded with copies of its
            largest node at weight 0.
        weights: same shape; the squared first components :math:`\tau_j^2`; each row sums to 1.
        num_matvecs: products with the operator spent by this call.
        size: the dimension ``n`` of the operator.
        num_nodes: ``(num_probes,)`` int64: the real (unpadded) nodes per row.

    The estimated distribution is
    :math:`\hat\mu = \frac{1}{P} \sum_{p} \sum_j \tau_{p,j}^2 \delta_{\theta_{p,j}}`, and for a
    function :math:`f`, :math:`\operatorname{tr} f(A) \approx n \int f \, d\hat\mu`.
    """

    nodes: Tensor
    weights: Tensor
    num_matvecs: int
    size: int
    num_nodes: Tensor

    @property
    def num_probes(self) -> int:
        return self.nodes.shape[0]

    @property
    def trace_estimate(self) -> float:
        r"""Unbiased estimate :math:`n \cdot \frac{1}{P} \sum_p \sum_j \tau_{p,j}^2 \theta_{p,j}`.

        For each probe the inner sum equals :math:`v^\top A v` exactly (it is :math:`(T)_{11}`), so
        this is Hutchinson's estimator with the normalised Rademacher probes.
        """
        return self.size * float(self._first_moments().mean())

    @property
    def trace_std_error(self) -> float:
        """Standard error of :attr:`trace_estimate` over probes (``nan`` with one probe)."""
        if self.num_probes < 2:
            return math.nan
        moments = self._first_moments()
        return self.size * float(moments.std(correction=1)) / math.sqrt(self.num_probes)

    def _first_moments(self) -> Tensor:
        return (self.weights * self.nodes).sum(dim=1)

    def default_sigma(self) -> float:
        """The broadening :meth:`density` uses when ``sigma=None``.

        ``0.01 * (max node - min node)``; if all nodes coincide, ``0.01 * max |node|``, and
        ``0.01`` for the zero operator.
        """
        spread = float(self.nodes.max() - self.nodes.min())
        if spread == 0.0:
            spread = float(self.nodes.abs().max()) or 1.0
        return _DEFAULT_SIGMA_FRACTION * spread

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        r"""Gaussian-broadened spectral density on ``grid``.

        .. math::

            \hat\phi_\sigma(t) = \frac{1}{P} \sum_{p=1}^{P} \sum_{j=1}^{m} \tau_{p,j}^2
                \frac{1}{\sigma\sqrt{2\pi}} \exp\Big(-\frac{(t - \theta_{p,j})^2}{2\sigma^2}\Big),

        a probability density: it integrates to 1 over the real line, hence to about 1 over a grid
        reaching a few ``sigma`` beyond the extreme nodes. No renormalisation over the grid is done,
        so a grid that cuts the spectrum shows the missing mass instead of hiding it.

        Args:
            grid: 1-D tensor of evaluation points (any float dtype; read as float64 on the CPU).
            sigma: broadening width > 0; default :meth:`default_sigma` (1% of the node spread). For
                Hessians with far outliers, pass a smaller one to resolve the bulk.

        Returns:
            A float64 CPU tensor of the density at each grid point.

        Example:
            >>> import torch
            >>> d = SpectralDensity(
            ...     nodes=torch.tensor([[0.0, 1.0]], dtype=torch.float64),
            ...     weights=torch.tensor([[0.5, 0.5]], dtype=torch.float64),
            ...     num_matvecs=2, size=2, num_nodes=torch.tensor([2]))
            >>> grid = torch.linspace(-1.0, 2.0, 3001, dtype=torch.float64)
            >>> round(float(torch.trapezoid(d.density(grid, sigma=0.1), grid)), 6)
            1.0
        """
        if not isinstance(grid, Tensor) or grid.ndim != 1 or not grid.is_floating_point():
            raise ValueError(
                "grid must be a 1-D floating-point tensor, got "
                f"{type(grid).__name__ if not isinstance(grid, Tensor) else tuple(grid.shape)}; "
                "use e.g. torch.linspace(lo, hi, 1000, dtype=torch.float64)"
            )
        sigma = self.default_sigma() if sigma is None else check_positive_finite("sigma", sigma)
        t = grid.detach().to("cpu", torch.float64)
        z = (t[:, None, None] - self.nodes[None, :, :]) / sigma
        kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2.0 * math.pi))
        return (kernel * self.weights[None, :, :]).sum(dim=2).mean(dim=1)

    def negative_mass(self, threshold: float = 0.0) -> float:
        r"""Estimated fraction of eigenvalues below ``-threshold``.

        .. math::

            \hat\mu\big((-\infty, -\mathrm{threshold})\big)
                = \frac{1}{P} \sum_p \sum_{j:\, \theta_{p,j} < -\mathrm{threshold}} \tau_{p,j}^2.

        Args:
            threshold: a margin >= 0, so that rounding-level negative eigenvalues are not counted.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a real number >= 0, got {threshold!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(
                f"threshold must be finite and >= 0, got {threshold!r}; it is a margin below zero"
            )
        mask = self.nodes < -float(threshold)
        return float((self.weights * mask).sum(dim=1).mean())

    def cdf_bounds(self, x: float) -> tuple[float, float]:
        r"""Bounds on the fraction of eigenvalues below ``x`` that the quadrature guarantees.

        A Gauss rule locates mass only to within the gaps between its nodes. For one probe's
        rule with nodes :math:`\theta_1 < \dots < \theta_m` and weights :math:`\tau_j^2`, the
        Chebyshev–Markov–Stieltjes inequalities bound the probe's spectral measure :math:`\mu_v`:

        .. math::

            \sum_{j < k} \tau_j^2 \le \mu_v\big((-\infty, \theta_k)\big), \qquad
            \mu_v\big((-\infty, \theta_k]\big) \le \sum_{j \le k} \tau_j^2 .

        So of the mass below ``x`` only the nodes below the largest node under ``x`` are sure
        (the weight of that node may lie on either side of ``x``), and at most the nodes up to the
        first node at or above ``x`` can be. A rule whose Lanczos run broke down early, or that
        has as many nodes as the operator's dimension, is the measure itself: both bounds are its
        mass below ``x``. The bounds are averaged over the probes, like :meth:`negative_mass`
        (which lies between them, with the nodes below ``x`` counted in full).

        Args:
            x: a finite real number.

        Returns:
            ``(lower, upper)``, fractions in ``[0, 1]``.

        Example:
            >>> import torch
            >>> d = SpectralDensity(
            ...     nodes=torch.tensor([[-2.0, -0.1, 3.0]], dtype=torch.float64),
            ...     weights=torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64),
            ...     num_matvecs=3, size=100, num_nodes=torch.tensor([3]))
            >>> d.negative_mass(threshold=0.05)  # the node at -0.1 counted in full
            0.7
            >>> tuple(round(b, 12) for b in d.cdf_bounds(-0.05))  # it may lie above -0.05
            (0.1, 1.0)
        """
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"x must be a real number, got {x!r}")
        if not math.isfinite(x):
            raise ValueError(f"x must be finite, got {x!r}; e.g. -1e-3 * lambda_max")
        below = self.nodes < float(x)
        mass = (self.weights * below).sum(dim=1)
        count = below.sum(dim=1)
        width = self.nodes.shape[1]

        def weight_at(index: Tensor) -> Tensor:  # each row's weight at its own index
            return self.weights.gather(1, index.clamp(0, width - 1)[:, None])[:, 0]

        # The largest node below x may hold mass from either side; the first node at or above x
        # may hold mass from below it.
        lower = mass - torch.where(count > 0, weight_at(count - 1), 0.0)
        upper = torch.where(count < width, mass + weight_at(count), 1.0)
        exact = (self.num_nodes < width) | (self.num_nodes >= self.size)
        lower = torch.where(exact, mass, lower).clamp(0.0, 1.0)
        upper = torch.where(exact, mass, upper).clamp(0.0, 1.0)
        return float(lower.mean()), float(upper.mean())

    def quantile(self, q: float) -> float:
        r"""The ``q``-quantile of the estimated eigenvalue distribution :math:`\hat\mu`.

        The smallest node :math:`\theta` with :math:`\hat\mu((-\infty, \theta]) \ge q`. Being a
        Gauss rule, :math:`\hat\mu` is discrete, so the quantile is one of the nodes.

        Args:
            q: a probability in ``[0, 1]``.
        """
        if isinstance(q, bool) or not isinstance(q, numbers.Real):
            raise TypeError(f"q must be a real number in [0, 1], got {q!r}")
        if not (0.0 <= q <= 1.0):
            raise ValueError(f"q must lie in [0, 1], got {q!r}; e.g. 0.5 for the median")
        nodes = self.nodes.flatten()
        weights = self.weights.flatten() / self.num_probes
        order = torch.argsort(nodes)
        cdf = torch.cumsum(weights[order], dim=0)
        # Rounding can leave the total a few ulps off 1; q = 1 must still find the last node.
        cdf = cdf / cdf[-1]
        pos = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64))[0])
        return float(nodes[order][min(pos, nodes.numel() - 1)])


def slq_density(
    op: SymmetricOperator,
    *,
    num_probes: int = 10,
    num_iters: int = 50,
    generator: torch.Generator | None = None,
    basis_device: torch.device | str | None = None,
) -> SpectralDensity:
    r"""Estimate the spectral density of ``op`` by stochastic Lanczos quadrature.

    For each of :math:`P` normalised Rademacher probes :math:`v_p = z_p / \sqrt{n}`, run
    :math:`m` Lanczos steps with full re-orthogonalisation; with :math:`T^{(p)} = S \Theta S^\top`,

    .. math::

        v_p^\top f(A)\, v_p \approx \sum_{j=1}^{m} \tau_{p,j}^2 f(\theta_{p,j}), \qquad
        \tau_{p,j} = S_{1j},

    exact for polynomials of degree :math:`\le 2m - 1`, and
    :math:`\mathbb{E}[n\, v_p^\top f(A) v_p] = \operatorname{tr} f(A)`.

    Args:
        op: the symmetric operator.
        num_probes: number of random probes :math:`P`; the error of spectral fractions decays
            like :math:`1/\sqrt{Pn}` for a typical operator.
        num_iters: Lanczos steps per probe :math:`m` (capped at ``n``): nodes per probe. The
            defaults (10 probes, 50 steps: 500 products) resolve the bulk and outliers of typical
            Hessians; Ghorbani et al. use about 90 steps for fine detail.
        generator: a ``torch.Generator`` on the operator's device; ``None`` uses a fresh one
            seeded with 0 (reproducible, global RNG untouched).
        basis_device: where to store each probe's Lanczos basis, see
            :func:`uba_auto.lanczos.lanczos`.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> import torch
        >>> from uba_auto.linear_operator import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> sd = slq_density(op, num_probes=4, num_iters=4)
        >>> round(sd.trace_estimate, 10)  # Rademacher probes are exact on a diagonal matrix
        5.0
    """
    op = check_operator(op)
    num_probes = check_int("num_probes", num_probes, minimum=1)
    num_iters = check_int("num_iters", num_iters, minimum=1)
    basis_dev = check_basis_device(basis_device, op)
    generator = resolve_generator(generator, op)

    n = op.size
    max_steps = min(num_iters, n)
    start_count = op.num_matvecs
    all_nodes = np.empty((num_probes, max_steps))
    all_weights = np.zeros((num_probes, max_steps))
    num_nodes = np.empty(num_probes, dtype=np.int64)
    for p in range(num_probes):
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=op.dtype, device=op.device)
        probe = signs.mul_(2).sub_(1) / math.sqrt(n)
        # No convergence test: the whole m-node rule is wanted. Breakdown is still detected (it
        # means the rule is already exact) so that no noise vector enters the basis.
        proc = run_lanczos(
            op,
            probe,
            max_steps=max_steps,
            basis_device=basis_dev,
            check_every=DEFAULT_CHECK_EVERY,
            should_stop=None,
        )
        theta, s = tridiagonal_eigh(proc.alpha, proc.beta)
        m = theta.size
        all_nodes[p, :m] = theta
        all_nodes[p, m:] = theta[-1]
        # Renormalised: the squared first components sum to 1 up to rounding.
        tau2 = s[0, :] ** 2
        all_weights[p, :m] = tau2 / tau2.sum()
        num_nodes[p] = m
    return SpectralDensity(
        nodes=torch.from_numpy(all_nodes),
        weights=torch.from_numpy(all_weights),
        num_matvecs=op.num_matvecs - start_count,
        size=n,
        num_nodes=torch.from_numpy(num_nodes),
    )
