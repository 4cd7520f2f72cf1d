"""The pure EMA teacher update of SMART."""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.methods.teacher import ema, teacher_of
from tests.support.reference_methods import reference_ema_
from tests.support.tiny_models import tiny_model


def test_ema_matches_the_in_place_update_and_mutates_nothing():
    model = tiny_model("bert")
    teacher_model = tiny_model("bert", seed=1)
    teacher = teacher_of(advfunc.params_of(teacher_model))
    params = advfunc.params_of(model)
    before = {n: t.clone() for n, t in teacher.items()}
    params_before = {n: p.clone() for n, p in params.items()}
    updated = ema(teacher, params, 0.9)
    reference_ema_(teacher_model, model, 0.9)
    for name, value in teacher_model.named_parameters():
        torch.testing.assert_close(updated[name], value.detach(), rtol=0, atol=1e-7)
        assert torch.equal(teacher[name], before[name]) and torch.equal(params[name], params_before[name])
        assert updated[name].data_ptr() != teacher[name].data_ptr()


def test_ema_ends_and_partial_teacher():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    teacher = {"a": torch.tensor([0.0, 0.0])}
    assert torch.equal(ema(teacher, params, 1.0)["a"], teacher["a"])
    assert torch.equal(ema(teacher, params, 0.0)["a"], params["a"])
    assert set(ema(teacher, params, 0.5)) == {"a"}


def test_teacher_of_is_a_copy():
    model = tiny_model("bert")
    params = advfunc.params_of(model)
    teacher = teacher_of(params)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not torch.equal(teacher["classifier.weight"], model.classifier.weight)


@pytest.mark.parametrize(
    "teacher,params,beta,error,match",
    [
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, 1.5, ValueError, "beta"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, True, TypeError, "beta"),
        ({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, 0.9, ValueError, "'a'"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.9, ValueError, "shape"),
        ([0.0], {"a": torch.zeros(3)}, 0.9, TypeError, "mapping"),
    ],
)
def test_ema_rejects_bad_input(teacher, params, beta, error, match):
    with pytest.raises(error, match=match):
        ema(teacher, params, beta)
