"""The purity contract every step must keep, as one reusable check."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def _assert_same(before: Any, after: Any, where: str) -> None:
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor), where
        assert before.dtype == after.dtype and before.shape == after.shape, where
        assert torch.equal(before, after), f"{where} changed"
    elif isinstance(before, Mapping):
        assert set(before) == set(after), f"{where} keys changed"
        for k in before:
            _assert_same(before[k], after[k], f"{where}[{k!r}]")
    else:
        assert before == after, f"{where} changed"


def assert_step_is_pure(
    model: nn.Module, call: Callable[[], Any], params: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
) -> Any:
    """Run ``call()`` (a step on ``params``, ``batch``) and check nothing it was given changed.

    Checks bitwise: ``params``, the batch tensors, every model parameter and buffer, each
    parameter's ``.grad`` (including None), ``requires_grad`` flags, the training mode of
    every submodule, and that no hook was left behind. Returns what ``call()`` returned.
    """
    params_before = _snapshot(dict(params))
    params_flags = {k: v.requires_grad for k, v in params.items()}
    batch_before = _snapshot(dict(batch))
    state_before = _snapshot(model.state_dict())
    grads_before = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    modes_before = {n: m.training for n, m in model.named_modules()}
    hooks_before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}

    result = call()

    _assert_same(params_before, dict(params), "params")
    assert {k: v.requires_grad for k, v in params.items()} == params_flags, "params requires_grad changed"
    _assert_same(batch_before, dict(batch), "batch")
    _assert_same(state_before, model.state_dict(), "model state")
    for n, p in model.named_parameters():
        before = grads_before[n]
        if before is None:
            assert p.grad is None, f"{n}.grad was written"
        else:
            assert p.grad is not None and torch.equal(before, p.grad), f"{n}.grad changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before, "requires_grad changed"
    assert {n: m.training for n, m in model.named_modules()} == modes_before, "training mode changed"
    hooks_after = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    assert hooks_after == hooks_before, "hooks left behind"
    return result
