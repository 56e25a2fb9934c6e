"""A step-time model of data-parallel training, its form chosen by leave-one-out error, and its projections.

    T(N) = c * b(N)  +  t0  +  2 (N - 1) / N * B / bandwidth  +  2 (N - 1) * latency

``b(N)`` is the per-rank batch (G / N under strong scaling, fixed under weak scaling), so ``c * b(N)`` is the
compute that divides by N; ``t0`` a constant per-step cost (optimizer, kernel launches, the stop-flag exchange);
``B`` the gradient bytes all-reduced per step. The last two terms are the textbook cost of a ring all-reduce
(Thakur, Rabenseifner and Gropp 2005; Patarasuk and Yuan 2009). DDP overlaps the all-reduce with the backward
pass, so the fitted bandwidth is an *effective* one. When a series has both single-node and multi-node points, the
bandwidth and latency of the two can be fitted apart (``bandwidth_inter``, ``latency_inter``).

Which terms a series needs is decided the way Extra-P (Calotoiu et al., SC 2013; ``extrap`` on PyPI) decides
among its hypotheses: every candidate form (compute plus any subset of the other terms) is fitted by
non-negative least squares with one scale left out at a time, and the form whose predictions of the left-out
scales are best (mean relative error) wins; a form with fewer terms wins a near tie. A form is a candidate only
when every fold can determine it (at most as many terms as the scales left in), and nothing is fitted with fewer
than :data:`MIN_SCALES` scales: two scales fit a two-term law exactly and would project with no warning.

Some terms cannot be told apart by step times alone: under strong scaling on one node the bandwidth term
2 (N-1)/N B / bw = 2 B / bw - (2 B / bw) / N is a constant plus compute-like 1/N, and under weak scaling the
compute term is a constant. Forms whose terms coincide are not candidates; when two forms fit the points
identically the one with a constant is chosen and the other is reported as ``equivalent``.

The prediction interval of a projection is the 95% interval of the residuals (Student t, when there are more
points than terms), widened to at least the largest leave-one-out relative error of the chosen form.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from scipy.optimize import nnls

MIN_SCALES = 3
TIE_TOLERANCE = 0.01  # relative: a form within 1% of the best leave-one-out error counts as a tie
OPTIONAL_TERMS = ("constant", "bandwidth", "latency")
INTER_TERMS = ("bandwidth_inter", "latency_inter")


def columns(
    terms: tuple[str, ...], world_size: np.ndarray, batch: np.ndarray, nodes: np.ndarray, grad_bytes: float
) -> np.ndarray:
    """The design matrix of ``terms``; with an ``_inter`` term, its intra-node twin covers single-node points."""
    n = np.asarray(world_size, dtype=np.float64)
    multi = np.asarray(nodes, dtype=np.float64) > 1
    bw = 2 * (n - 1) / n * grad_bytes
    lat = 2 * (n - 1)
    table = {
        "compute": np.asarray(batch, dtype=np.float64),
        "constant": np.ones_like(n),
        "bandwidth": np.where(multi, 0.0, bw) if "bandwidth_inter" in terms else bw,
        "latency": np.where(multi, 0.0, lat) if "latency_inter" in terms else lat,
        "bandwidth_inter": np.where(multi, bw, 0.0),
        "latency_inter": np.where(multi, lat, 0.0),
    }
    return np.column_stack([table[t] for t in terms])


@dataclass(frozen=True)
class StepTimeModel:
    """The chosen form of ``T(N)`` with its coefficients, leave-one-out errors and the residual spread."""

    form: tuple[str, ...]
    coef: dict[str, float]
    grad_bytes: float
    num_points: int
    num_scales: int
    rmse_s: float
    loo_error: float  # mean relative error predicting each left-out scale
    loo_max_error: float
    candidates: dict[str, float] = field(default_factory=dict)  # form name -> its leave-one-out error
    equivalent: tuple[
        str, ...
    ] = ()  # forms that fit these points identically: their terms cannot be told apart
    dof: int = 0
    sigma_s: float = math.nan
    xtx_inv: np.ndarray | None = None

    @property
    def name(self) -> str:
        return form_name(self.form)

    @property
    def compute_s_per_sample(self) -> float:
        return self.coef.get("compute", 0.0)

    @property
    def constant_s(self) -> float:
        return self.coef.get("constant", 0.0)

    @property
    def latency_s(self) -> float:
        return self.coef.get("latency", 0.0)

    @property
    def inv_bandwidth_s_per_byte(self) -> float:
        return self.coef.get("bandwidth", 0.0)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Effective all-reduce bandwidth (inf when the chosen form has no bandwidth cost)."""
        inv = self.inv_bandwidth_s_per_byte
        return 1.0 / inv if inv > 0 else math.inf

    def _design(self, world_size: np.ndarray | float, batch: np.ndarray | float, nodes: np.ndarray | float):
        n = np.atleast_1d(np.asarray(world_size, dtype=np.float64))
        b = np.broadcast_to(np.asarray(batch, dtype=np.float64), n.shape)
        k = np.broadcast_to(np.asarray(nodes, dtype=np.float64), n.shape)
        return columns(self.form, n, b, k, self.grad_bytes)

    def step_time_s(
        self,
        world_size: np.ndarray | float,
        batch_per_rank: np.ndarray | float,
        nodes: np.ndarray | float = 1,
    ) -> np.ndarray:
        """Predicted seconds per step."""
        x = self._design(world_size, batch_per_rank, nodes)
        return x @ np.array([self.coef[t] for t in self.form])

    def comm_time_s(self, world_size: np.ndarray | float, nodes: np.ndarray | float = 1) -> np.ndarray:
        """The all-reduce terms of a step at ``world_size`` ranks (what the model calls communication)."""
        x = self._design(world_size, 0.0, nodes)
        keep = np.array([t not in ("compute", "constant") for t in self.form])
        return x[:, keep] @ np.array([self.coef[t] for t in self.form])[keep]

    def interval_s(
        self,
        world_size: np.ndarray | float,
        batch_per_rank: np.ndarray | float,
        nodes: np.ndarray | float = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """95% prediction interval of the step time (see the module docstring)."""
        x = self._design(world_size, batch_per_rank, nodes)
        y = x @ np.array([self.coef[t] for t in self.form])
        half = y * self.loo_max_error
        if self.dof > 0 and self.xtx_inv is not None and math.isfinite(self.sigma_s):
            leverage = np.einsum("ij,jk,ik->i", x, self.xtx_inv, x)
            t = float(stats.t.ppf(0.975, self.dof))
            half = np.maximum(half, t * self.sigma_s * np.sqrt(1 + leverage))
        return np.maximum(y - half, 0.0), y + half


def form_name(form: tuple[str, ...]) -> str:
    """``compute/N + constant + bandwidth`` style name of a form."""
    labels = {"compute": "compute/N"}
    return " + ".join(labels.get(t, t) for t in form)


def candidate_forms(nodes: np.ndarray) -> list[tuple[str, ...]]:
    """Compute plus every subset of the other terms; split intra/inter terms only when both kinds of point exist."""
    optional = list(OPTIONAL_TERMS)
    nodes = np.asarray(nodes, dtype=np.float64)
    if (nodes > 1).any() and (nodes <= 1).any():
        optional += list(INTER_TERMS)
    forms = []
    for size in range(len(optional) + 1):
        for subset in itertools.combinations(optional, size):
            forms.append(("compute", *subset))
    return forms


def _nnls_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    scale = np.abs(x).max(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # conditioning: bytes ~1e8 beside batches ~10
    solution, _ = nnls(x / scale, y)
    return solution / scale


def _loo(
    form: tuple[str, ...], n, b, k, y, scales: list[tuple[float, float]], grad_bytes: float
) -> np.ndarray:
    """Relative error predicting each scale (its median) from a fit to the others; inf if a fold is undetermined."""
    errors = []
    for ws, nodes in scales:
        out = (n == ws) & (k == nodes)
        x_in = columns(form, n[~out], b[~out], k[~out], grad_bytes)
        if np.linalg.matrix_rank(x_in) < len(form):
            return np.array([math.inf])
        coef = _nnls_fit(x_in, y[~out])
        measured = float(np.median(y[out]))
        predicted = float(np.median(columns(form, n[out], b[out], k[out], grad_bytes) @ coef))
        errors.append(abs(predicted - measured) / measured if measured > 0 else math.inf)
    return np.array(errors)


def fit_step_time_model(
    world_size: np.ndarray,
    batch_per_rank: np.ndarray,
    step_s: np.ndarray,
    grad_bytes: float,
    nodes: np.ndarray | None = None,
) -> StepTimeModel | None:
    """Chooses and fits the form of ``T(N)`` (module docstring); None with fewer than :data:`MIN_SCALES` scales
    or unknown gradient bytes."""
    n = np.asarray(world_size, dtype=np.float64)
    b = np.asarray(batch_per_rank, dtype=np.float64)
    y = np.asarray(step_s, dtype=np.float64)
    k = np.ones_like(n) if nodes is None else np.nan_to_num(np.asarray(nodes, dtype=np.float64), nan=1.0)
    keep = np.isfinite(n) & np.isfinite(b) & np.isfinite(y) & (y > 0)
    n, b, y, k = n[keep], b[keep], y[keep], k[keep]
    scales = sorted(set(zip(n.tolist(), k.tolist(), strict=True)))
    if len(scales) < MIN_SCALES or not grad_bytes or grad_bytes <= 0:
        return None
    scored: list[tuple[float, int, tuple[str, ...], np.ndarray]] = []
    for form in candidate_forms(k):
        if len(form) > len(scales) - 1:
            continue
        if np.linalg.matrix_rank(columns(form, n, b, k, grad_bytes)) < len(form):
            continue  # two terms of it are one (strong scaling: 2(N-1)/N = 2 - 2/N; weak: b(N) is constant)
        errors = _loo(form, n, b, k, y, scales, grad_bytes)
        if np.isfinite(errors).all():
            scored.append((float(errors.mean()), len(form), form, errors))
    if not scored:
        return None
    best = min(s[0] for s in scored)
    near = [s for s in scored if s[0] <= best * (1 + TIE_TOLERANCE) + 1e-12]
    loo_mean, _, form, errors = min(near, key=lambda s: (s[1], _preference(s[2]), s[0]))
    x = columns(form, n, b, k, grad_bytes)
    same_span = [
        form_name(other)
        for _, size, other, _ in scored
        if other != form and size == len(form) and _same_span(x, columns(other, n, b, k, grad_bytes))
    ]
    coef = _nnls_fit(x, y)
    residual = y - x @ coef
    dof = len(y) - len(form)
    sigma = float(np.sqrt(np.sum(residual**2) / dof)) if dof > 0 else math.nan
    return StepTimeModel(
        form=form,
        coef=dict(zip(form, coef.tolist(), strict=True)),
        grad_bytes=float(grad_bytes),
        num_points=len(y),
        num_scales=len(scales),
        rmse_s=float(np.sqrt(np.mean(residual**2))),
        loo_error=loo_mean,
        loo_max_error=float(errors.max()),
        candidates={form_name(s[2]): s[0] for s in sorted(scored, key=lambda s: s[0])},
        equivalent=tuple(same_span),
        dof=dof,
        sigma_s=sigma,
        xtx_inv=np.linalg.pinv(x.T @ x),
    )


def _preference(form: tuple[str, ...]) -> int:
    """Among equally good forms of one size, prefer a constant to a bandwidth term (the simpler explanation)."""
    order = ("constant", "latency", "bandwidth", "latency_inter", "bandwidth_inter")
    return sum(2 ** order.index(t) for t in form if t in order)


def _same_span(a: np.ndarray, b: np.ndarray) -> bool:
    rank = np.linalg.matrix_rank
    return rank(a) == rank(b) == rank(np.hstack([a, b]))


def batch_at(
    scaling: str, world_size: np.ndarray | float, global_batch: float, batch_per_rank: float
) -> np.ndarray:
    """Per-rank batch at ``world_size``: the global batch split (strong) or the fixed per-rank batch (weak)."""
    n = np.asarray(world_size, dtype=np.float64)
    return global_batch / n if scaling == "strong" else np.full_like(n, float(batch_per_rank))
