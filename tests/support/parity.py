"""Comparison of gradient dicts with the tolerances of the parity contract."""

from __future__ import annotations

import torch

# The parity contract: relative error of the whole gradient vector, and per-tensor rtol/atol
# (a near-zero gradient, such as an attention key bias, has no meaningful relative error).
VECTOR_RTOL = 1e-4
TENSOR_RTOL = 1e-3
TENSOR_ATOL = 1e-5


def assert_grads_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str = "") -> None:
    assert set(actual) == set(expected), f"{where}: keys differ: {set(actual) ^ set(expected)}"
    for name in expected:
        assert actual[name].shape == expected[name].shape, f"{where}: {name} shape"
        assert actual[name].dtype == expected[name].dtype, f"{where}: {name} dtype"
    a = torch.cat([actual[n].double().flatten() for n in expected])
    e = torch.cat([expected[n].double().flatten() for n in expected])
    relative = ((a - e).norm() / e.norm()).item()
    assert relative <= VECTOR_RTOL, f"{where}: relative error of the gradient vector {relative:.3e}"
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], rtol=TENSOR_RTOL, atol=TENSOR_ATOL, msg=lambda m, n=name: f"{where}: {n}: {m}"
        )
