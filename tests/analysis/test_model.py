"""The step-time model: synthetic step times from known laws (a constant term, noise, two kinds of link) in,
the law's form and parameters out; and agreement with Extra-P's model family on the chosen form."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from r2d2_hpc.analysis.model import MIN_SCALES, fit_step_time_model

GRAD_BYTES = 8_000_000


def _law(n, b, c=0.01, t0=0.0, inv_bw=0.0, lat=0.0, nodes=1, inv_bw_inter=None, lat_inter=None):
    n = np.asarray(n, dtype=float)
    multi = np.asarray(nodes) > 1
    bw = np.where(multi, inv_bw if inv_bw_inter is None else inv_bw_inter, inv_bw)
    la = np.where(multi, lat if lat_inter is None else lat_inter, lat)
    return c * b + t0 + 2 * (n - 1) / n * GRAD_BYTES * bw + 2 * (n - 1) * la


def test_strong_scaling_with_a_20_ms_constant_and_noise_recovers_it() -> None:
    """The old model (no constant) put such a constant into the bandwidth; this one finds it."""
    rng = np.random.default_rng(1)
    n = np.repeat([1, 2, 4, 8, 16], 3).astype(float)
    b = 128 / n
    truth = _law(n, b, c=0.004, t0=0.020, lat=0.002)
    model = fit_step_time_model(n, b, truth * (1 + 0.003 * rng.standard_normal(len(n))), GRAD_BYTES)
    assert model is not None and model.form == ("compute", "constant", "latency")
    assert model.constant_s == pytest.approx(0.020, rel=0.1)
    assert model.latency_s == pytest.approx(0.002, rel=0.1)
    assert model.compute_s_per_sample == pytest.approx(0.004, rel=0.02)
    assert 0 < model.loo_error < 0.02 and model.dof == len(n) - 3
    lo, hi = model.interval_s(32, 4)
    assert lo[0] < _law(32, 4, c=0.004, t0=0.020, lat=0.002) < hi[0]


def test_weak_scaling_recovers_bandwidth_and_latency_exactly() -> None:
    n = np.array([1, 2, 4, 8, 16], dtype=float)
    b = np.full_like(n, 8.0)
    model = fit_step_time_model(n, b, _law(n, b, c=0.02, inv_bw=2e-10, lat=5e-5), GRAD_BYTES)
    assert model.form == ("compute", "bandwidth", "latency")  # compute x b(N) is the constant here
    assert model.bandwidth_bytes_per_s == pytest.approx(5e9, rel=1e-6)
    assert model.latency_s == pytest.approx(5e-5, rel=1e-6)
    assert model.compute_s_per_sample == pytest.approx(0.02, rel=1e-6)


def test_no_constant_in_the_law_means_none_in_the_form() -> None:
    n = np.array([1, 2, 4, 8], dtype=float)
    b = 64 / n
    model = fit_step_time_model(n, b, _law(n, b, c=0.01, lat=1e-3), GRAD_BYTES)
    assert model.form == ("compute", "latency") and model.loo_error < 1e-9


def test_intra_and_inter_node_links_are_fitted_apart() -> None:
    n = np.array([1, 2, 4, 8, 16, 32], dtype=float)
    nodes = np.array([1, 1, 1, 2, 4, 8], dtype=float)
    b = np.full_like(n, 16.0)
    steps = _law(n, b, c=0.01, inv_bw=1e-10, nodes=nodes, inv_bw_inter=1e-9)
    model = fit_step_time_model(n, b, steps, GRAD_BYTES, nodes)
    assert model.form == ("compute", "bandwidth", "bandwidth_inter")
    assert 1 / model.coef["bandwidth"] == pytest.approx(1e10, rel=1e-6)
    assert 1 / model.coef["bandwidth_inter"] == pytest.approx(1e9, rel=1e-6)
    assert model.step_time_s(64, 16, 16)[0] == pytest.approx(
        float(_law(64, 16, c=0.01, inv_bw=1e-10, nodes=16, inv_bw_inter=1e-9)), rel=1e-6
    )


def test_fewer_than_three_scales_fit_nothing() -> None:
    assert MIN_SCALES == 3
    n = np.array([1, 1, 2, 2], dtype=float)
    assert fit_step_time_model(n, 8 / n, _law(n, 8 / n), GRAD_BYTES) is None


# Extra-P's performance model normal form (Calotoiu et al., SC 2013) for one parameter:
# f(N) = c0 + c1 * N^i * log2(N)^j, the hypothesis chosen by leave-one-out cross-validation. The exponent set is
# Extra-P's, extended by negative exponents (a strong-scaling step time falls like 1/N).
PMNF_I = (-2, -1.5, -1, -2 / 3, -0.5, -1 / 3, -0.25, 0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1, 1.25, 1.5, 2)
PMNF_J = (0, 1, 2)


def _pmnf_choice(n: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    best, choice = math.inf, (0.0, 0)
    for i, j in itertools.product(PMNF_I, PMNF_J):
        if i == 0 and j == 0:
            continue
        term = n**i * np.log2(n) ** j
        errors = []
        for k in range(len(n)):
            keep = np.arange(len(n)) != k
            x = np.column_stack([np.ones(keep.sum()), term[keep]])
            coef = np.linalg.lstsq(x, y[keep], rcond=None)[0]
            errors.append(abs(coef[0] + coef[1] * term[k] - y[k]) / y[k])
        if np.mean(errors) < best - 1e-12:
            best, choice = float(np.mean(errors)), (i, j)
    return choice


@pytest.mark.parametrize(
    ("scaling", "law", "our_form", "extrap_term"),
    [
        ("strong", {"c": 0.01, "t0": 0.03}, ("compute", "constant"), (-1, 0)),
        ("weak", {"c": 0.01, "lat": 2e-3}, ("compute", "latency"), (1, 0)),
    ],
)
def test_extrap_model_family_agrees_on_the_form(
    scaling: str, law: dict, our_form: tuple, extrap_term: tuple
) -> None:
    n = np.array([1, 2, 4, 8, 16, 32], dtype=float)
    b = 256 / n if scaling == "strong" else np.full_like(n, 8.0)
    rng = np.random.default_rng(3)
    steps = _law(n, b, **law) * (1 + 0.001 * rng.standard_normal(len(n)))
    model = fit_step_time_model(n, b, steps, GRAD_BYTES)
    assert model.form == our_form
    # N = 1 has log2(N) = 0: Extra-P fits from N = 2 on as well when log terms are in play
    assert _pmnf_choice(n[1:], steps[1:]) == extrap_term
