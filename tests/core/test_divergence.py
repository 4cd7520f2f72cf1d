"""The KL terms of VAT, SMART and R3F: >= 0 always, exactly 0 at equal logits, F.kl_div's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import advfunc
from advfunc.core.divergence import kl_logits, label_positions, symmetric_kl
from advfunc.core.model import PerturbedModel, logits_of
from tests.support.tiny_models import padded_batch, tiny_model

finite = st.floats(-60.0, 60.0, width=32)
tiny = st.floats(-(2.0**-20), 2.0**-20, width=32)  # ~1e-6: logits equal to a few ulps


def logits(shape):
    return arrays("float32", shape, elements=finite).map(torch.from_numpy)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([(1, 2), (4, 3), (2, 5, 7)]))
def test_kl_is_non_negative_and_exactly_zero_at_equal_logits(data, shape):
    p = data.draw(logits(shape))
    q = data.draw(logits(shape))
    near = p + data.draw(arrays("float32", shape, elements=tiny).map(torch.from_numpy))
    for a, b in ((p, q), (p, near), (near, p)):
        assert kl_logits(a, b) >= 0
        assert symmetric_kl(a, b) >= 0
    assert kl_logits(p, p).item() == 0.0
    assert symmetric_kl(p, p.clone()).item() == 0.0


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7)])
def test_kl_value_and_gradient_are_those_of_f_kl_div(shape):
    g = torch.Generator().manual_seed(0)
    p = (3 * torch.randn(shape, generator=g)).requires_grad_()
    q = (3 * torch.randn(shape, generator=g)).requires_grad_()
    ours = kl_logits(p, q)
    positions = p.numel() // shape[-1]
    theirs = F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="sum") / positions
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    ours_grads = torch.autograd.grad(ours, [p, q])
    theirs_grads = torch.autograd.grad(theirs, [p, q])
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kl_of_a_model_with_itself_at_zero_offset_is_exactly_zero():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    perturbed = PerturbedModel(model)
    kwargs = perturbed.check_batch(batch)
    params = advfunc.params_of(model)
    with perturbed.hooked():
        clean = perturbed.outputs(params, kwargs, None).logits
        zero = torch.zeros(*batch["input_ids"].shape, 32)
        offset = perturbed.outputs(params, kwargs, zero).logits
    assert kl_logits(clean, offset).item() == 0.0
    assert symmetric_kl(clean, offset).item() == 0.0


def test_kl_refuses_mismatched_shapes_and_outputs_without_logits():
    with pytest.raises(ValueError, match="equal shape"):
        kl_logits(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits"):
        logits_of(object())


def test_kl_over_counted_positions_equals_kl_of_those_positions_alone():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    labels = torch.full((3, 7), -100)
    labels[0, 3:6] = 5
    labels[2, 1:7] = 2
    positions = label_positions(labels)
    # logits at t score token t + 1: row 0 counts t = 2, 3, 4; row 2 counts t = 0..5; row 1 nothing
    assert positions.nonzero().tolist() == [[0, 2], [0, 3], [0, 4], [2, 0], [2, 1], [2, 2], [2, 3], [2, 4], [2, 5]]
    torch.testing.assert_close(kl_logits(p, q, positions), kl_logits(p[positions], q[positions]))
    torch.testing.assert_close(symmetric_kl(p, q, positions), symmetric_kl(p[positions], q[positions]))
    assert float(kl_logits(p, q, torch.zeros(3, 7, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="positions has shape"):
        kl_logits(p, q, positions[:, :3])


@pytest.mark.parametrize("scale", [1e-7, 1e-5, 1e-3])
def test_kl_gradient_near_equal_logits_is_that_of_float64(scale):
    # Near p = q the gradient q − p lies below the probabilities' rounding: it must still
    # point where float64 says, or VAT and SMART find no direction.
    g = torch.Generator().manual_seed(1)
    p = torch.randn(6, 5, generator=g)
    q = (p + scale * torch.randn(6, 5, generator=g)).requires_grad_()
    (ours,) = torch.autograd.grad(kl_logits(p, q), q)
    q64 = q.detach().double().requires_grad_()
    exact = F.kl_div(F.log_softmax(q64, -1), F.softmax(p.double(), -1), reduction="sum") / 6
    (expected,) = torch.autograd.grad(exact, q64)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
