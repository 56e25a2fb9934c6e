"""A fitted step-time model of data-parallel training, and its projections beyond the measured scales.

    T(N) = c * b(N)  +  2 (N - 1) / N * B / bandwidth  +  2 (N - 1) * latency

``b(N)`` is the per-rank batch (G / N under strong scaling, fixed under weak scaling), ``c`` the seconds per
sample on one rank (data wait, forward, backward, optimizer), ``B`` the gradient bytes all-reduced per step. The
last two terms are the textbook cost of a ring all-reduce (Thakur, Rabenseifner and Gropp 2005; Patarasuk and
Yuan 2009): each rank sends and receives 2 (N - 1) / N of the gradient in 2 (N - 1) latency-bound steps. It
assumes no overlap of communication with the backward pass (DDP does overlap, so the fitted bandwidth is an
*effective* one) and one bandwidth for all links (a multi-node study mixes NVLink and network: the fit averages).

The parameters are fitted by non-negative least squares on every usable run's mean step time. With only two
distinct scales the latency term is dropped (it could not be told from the bandwidth term); with one, no fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls


@dataclass(frozen=True)
class StepTimeModel:
    """Fitted parameters of ``T(N)``; see the module docstring."""

    compute_s_per_sample: float
    inv_bandwidth_s_per_byte: float
    latency_s: float
    grad_bytes: float
    num_points: int
    num_scales: int
    rmse_s: float
    fitted_latency: bool

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Effective all-reduce bandwidth (inf when the fit found no bandwidth cost)."""
        return 1.0 / self.inv_bandwidth_s_per_byte if self.inv_bandwidth_s_per_byte > 0 else math.inf

    def comm_time_s(self, world_size: np.ndarray | float) -> np.ndarray:
        """The all-reduce part of a step at ``world_size`` ranks."""
        n = np.asarray(world_size, dtype=np.float64)
        return (
            2 * (n - 1) / n * self.grad_bytes * self.inv_bandwidth_s_per_byte + 2 * (n - 1) * self.latency_s
        )

    def step_time_s(self, world_size: np.ndarray | float, batch_per_rank: np.ndarray | float) -> np.ndarray:
        """Predicted seconds per step."""
        return self.compute_s_per_sample * np.asarray(batch_per_rank, dtype=np.float64) + self.comm_time_s(
            world_size
        )


def design_matrix(world_size: np.ndarray, batch_per_rank: np.ndarray, grad_bytes: float) -> np.ndarray:
    """Columns: per-rank batch, bandwidth term 2(N-1)/N * B, latency term 2(N-1)."""
    n = np.asarray(world_size, dtype=np.float64)
    return np.column_stack(
        [np.asarray(batch_per_rank, dtype=np.float64), 2 * (n - 1) / n * grad_bytes, 2 * (n - 1)]
    )


def fit_step_time_model(
    world_size: np.ndarray, batch_per_rank: np.ndarray, step_s: np.ndarray, grad_bytes: float
) -> StepTimeModel | None:
    """Fits :class:`StepTimeModel` to measured mean step times; None with fewer than two distinct scales."""
    world_size = np.asarray(world_size, dtype=np.float64)
    step_s = np.asarray(step_s, dtype=np.float64)
    keep = (
        np.isfinite(step_s) & np.isfinite(world_size) & np.isfinite(np.asarray(batch_per_rank, dtype=float))
    )
    world_size, batch_per_rank, step_s = (
        world_size[keep],
        np.asarray(batch_per_rank, float)[keep],
        step_s[keep],
    )
    num_scales = len(np.unique(world_size))
    if num_scales < 2 or not grad_bytes or grad_bytes <= 0:
        return None
    full = design_matrix(world_size, batch_per_rank, grad_bytes)
    columns = [0, 1, 2] if num_scales >= 3 else [0, 1]
    a = full[:, columns]
    scale = np.where(np.abs(a).max(axis=0) > 0, np.abs(a).max(axis=0), 1.0)  # conditioning: bytes ~1e8
    solution, _ = nnls(a / scale, step_s)
    params = np.zeros(3)
    params[columns] = solution / scale
    residual = step_s - full @ params
    return StepTimeModel(
        compute_s_per_sample=float(params[0]),
        inv_bandwidth_s_per_byte=float(params[1]),
        latency_s=float(params[2]),
        grad_bytes=float(grad_bytes),
        num_points=len(step_s),
        num_scales=num_scales,
        rmse_s=float(np.sqrt(np.mean(residual**2))),
        fitted_latency=len(columns) == 3,
    )


def batch_at(
    scaling: str, world_size: np.ndarray | float, global_batch: float, batch_per_rank: float
) -> np.ndarray:
    """Per-rank batch at ``world_size``: the global batch split (strong) or the fixed per-rank batch (weak)."""
    n = np.asarray(world_size, dtype=np.float64)
    return global_batch / n if scaling == "strong" else np.full_like(n, float(batch_per_rank))
