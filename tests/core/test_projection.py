"""Property tests of the projections onto L2 and L∞ balls."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import advfunc

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6))
epsilons = st.floats(min_value=1e-3, max_value=1e3)
SETTINGS = settings(max_examples=60, deadline=None)


def tensors(shape_strategy=shapes):
    import numpy as np

    return shape_strategy.flatmap(lambda s: arrays(np.float32, s, elements=finite)).map(torch.from_numpy)


def l2(x, dims=None):
    """Independent oracle: the float64 L2 norm."""
    x = x.double()
    if dims is None:
        return x.norm()
    return x.flatten(1).norm(dim=1)


@SETTINGS
@given(tensors(), epsilons)
def test_l2_global_bound_inside_and_boundary(delta, epsilon):
    out = advfunc.project_l2(delta, epsilon)
    norm_in, norm_out = l2(delta).item(), l2(out).item()
    assert norm_out <= epsilon * (1 + 1e-5) + 1e-12
    if norm_in <= epsilon:
        assert torch.equal(out, delta)  # inside: unchanged, bitwise
    else:
        assert math.isclose(norm_out, epsilon, rel_tol=1e-5)
        # the direction is kept
        torch.testing.assert_close(out.double() * norm_in / epsilon, delta.double(), rtol=1e-4, atol=1e-6)


@SETTINGS
@given(tensors(), epsilons)
def test_l2_per_example_bound(delta, epsilon):
    out = advfunc.project_l2(delta, epsilon, dims=(1, 2))
    for i in range(delta.shape[0]):
        n_in, n_out = l2(delta[i]).item(), l2(out[i]).item()
        assert n_out <= epsilon * (1 + 1e-5) + 1e-12
        if n_in <= epsilon:
            assert torch.equal(out[i], delta[i])
        else:
            assert math.isclose(n_out, epsilon, rel_tol=1e-5)


@SETTINGS
@given(tensors(), epsilons)
def test_linf_bound_and_inside(delta, epsilon):
    out = advfunc.project_linf(delta, epsilon)
    assert out.abs().max().item() <= epsilon * (1 + 1e-6)
    inside = delta.abs() <= epsilon
    assert torch.equal(out[inside], delta[inside])
    outside = ~inside
    torch.testing.assert_close(out[outside].abs(), torch.full_like(out[outside], epsilon))
    assert torch.equal(torch.sign(out[outside]), torch.sign(delta[outside]))


@SETTINGS
@given(shapes, epsilons)
def test_zero_stays_zero(shape, epsilon):
    zero = torch.zeros(shape)
    for out in (advfunc.project_l2(zero, epsilon), advfunc.project_l2(zero, epsilon, dims=(1, 2))):
        assert torch.equal(out, zero) and not out.isnan().any()
    assert torch.equal(advfunc.project_linf(zero, epsilon), zero)


@SETTINGS
@given(tensors(), st.sampled_from([torch.float16, torch.bfloat16]), st.floats(min_value=0.5, max_value=100))
def test_low_precision_is_finite_and_bounded(delta, dtype, epsilon):
    # values up to 1e4: squaring them overflows fp16, so the norm must be taken in fp32
    low = delta.to(dtype)
    for dims in (None, (1, 2)):
        out = advfunc.project_l2(low, epsilon, dims=dims)
        assert out.dtype == dtype and torch.isfinite(out).all()
        norms = l2(out.float(), dims)
        assert (norms <= epsilon * (1 + 1e-2)).all()  # rounding to 8/11 mantissa bits
    out = advfunc.project_linf(low, epsilon)
    assert out.dtype == dtype and out.float().abs().max() <= epsilon * (1 + 1e-2)


def test_fp16_squared_norm_overflow_projects_correctly():
    delta = torch.full((4, 8), 300.0, dtype=torch.float16)  # 300² overflows fp16
    out = advfunc.project_l2(delta, 1.0)
    assert torch.isfinite(out).all()
    assert abs(out.float().norm().item() - 1.0) < 1e-2


def test_bad_epsilon_is_named():
    import pytest

    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="epsilon"):
            advfunc.project_l2(torch.ones(3), bad)
        with pytest.raises(ValueError, match="epsilon"):
            advfunc.project_linf(torch.ones(3), bad)
