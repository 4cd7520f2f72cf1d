"""The gradient engine: accumulation into the step's own buffers, and safe buffers."""

from __future__ import annotations

import torch

import advfunc
from advfunc.core.engine import Engine, owned
from advfunc.core.model import PerturbedModel
from advfunc.core.step import prepare
from advfunc.core.targets import resolve_target
from tests.support.tiny_models import padded_batch, tiny_model


def _engine():
    model = tiny_model("bert")
    perturbed = PerturbedModel(model)
    target = resolve_target(model, "embeds")
    call = prepare(model, perturbed, target, advfunc.params_of(model), padded_batch("bert"))
    return Engine(perturbed, target, compiled=False), perturbed, target, call


def test_second_pass_accumulates_into_the_first_pass_buffers():
    engine, perturbed, target, call = _engine()
    zero = call.zeros(target)
    with perturbed.hooked():
        first = engine.full(call, zero, with_delta_grad=True)
        expected = {n: 2 * g for n, g in first.param_grads.items()}
        pointers = {n: g.data_ptr() for n, g in first.param_grads.items()}
        second = engine.full(call, zero, with_delta_grad=False, accumulate_into=first.param_grads)
    for name, grad in second.param_grads.items():
        assert grad.data_ptr() == pointers[name]  # the same buffers: no second gradient dict
        torch.testing.assert_close(grad, expected[name])


def test_owned_separates_aliased_and_broadcast_gradients():
    shared = torch.ones(3)
    broadcast = torch.ones(()).expand(4)
    safe = owned({"a": shared, "b": shared, "c": broadcast})
    assert safe["a"] is shared
    assert safe["b"].data_ptr() != shared.data_ptr()
    assert safe["c"].is_contiguous() and safe["c"]._base is None
    for tensor in safe.values():
        tensor.add_(1.0)
    assert torch.equal(shared, torch.full((3,), 2.0))


def test_delta_only_pass_forms_no_parameter_gradient():
    """PGD's inner passes differentiate δ alone: no parameter is a leaf requiring grad."""
    engine, perturbed, target, call = _engine()
    seen = []
    handles = [
        m.register_forward_hook(lambda m, a, o: seen.append(m.weight.requires_grad))
        for m in [
            perturbed.model.bert.encoder.layer[0].attention.self.query,
        ]
    ]
    try:
        with perturbed.hooked():
            grads = engine.delta_only(call.params, call.kwargs, call.layout, call.zeros(target), torch.tensor(1.0))
    finally:
        for h in handles:
            h.remove()
    assert seen == [False]
    assert set(grads) == {"embeds"} and grads["embeds"].shape == (4, 12, 32)
