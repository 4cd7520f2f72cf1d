"""One protocol for every method: ``state = step.init(params)``, ``step.update``, ``step.after_update``.

The oracle is each method's own call shape, driven by hand the way its docstring says
(SMART: ``step(params, batch, teacher)`` and ``advfunc.ema``; free AT:
``step(params, batch, delta)`` replayed with δ carried).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from transformers import TrainingArguments, default_data_collator

import advfunc
from advfunc.hf import AdversarialTrainer
from tests.tiny_models import padded_batch, tiny_model


def _sgd(model: torch.nn.Module, grads: dict[str, torch.Tensor], lr: float = 0.5) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in grads:
                p.sub_(lr * grads[name])


def _batches(count: int) -> list[dict[str, torch.Tensor]]:
    return [padded_batch("bert", seed=k) for k in range(count)]


def test_a_stateless_step_carries_an_empty_state_and_gives_its_own_grads():
    model = tiny_model("bert")
    step = advfunc.stateful(advfunc.fgm(model, epsilon=0.1))
    params, batch = advfunc.params_of(model), padded_batch("bert")
    state = step.init(params)
    grads, out, after = step.update(params, batch, state)
    expected, expected_out = step(params, batch)
    assert state == {} and after == {} and step.after_update(after, params) == {}
    assert not step.carries_state and step.replays == 1
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected_out.loss, rtol=0, atol=0)
    assert advfunc.stateful(step) is step


def test_smart_through_the_protocol_equals_the_teacher_loop_by_hand():
    model, twin = tiny_model("bert"), tiny_model("bert")
    step = advfunc.smart(model, epsilon=0.01, step_size=0.01, noise_var=0.0, beta=0.7)
    by_hand = advfunc.smart(twin, epsilon=0.01, step_size=0.01, noise_var=0.0)
    params, twin_params = advfunc.params_of(model), advfunc.params_of(twin)
    state = step.init(params)
    teacher = advfunc.teacher_of(twin_params)
    for batch in _batches(3):
        grads, _, state = step.update(params, batch, state)
        expected, _ = by_hand(twin_params, batch, teacher)
        for name, value in expected.items():
            torch.testing.assert_close(grads[name], value, rtol=0, atol=0, msg=name)
        _sgd(model, grads)
        _sgd(twin, expected)
        state = step.after_update(state, params)
        teacher = advfunc.ema(teacher, twin_params, 0.7)
    assert step.carries_state
    for name, value in teacher.items():
        torch.testing.assert_close(state["teacher"][name], value, rtol=0, atol=0, msg=name)
        assert not torch.equal(value, twin_params[name]) or name.endswith("key.bias"), "the teacher never moved"


def test_free_at_through_the_protocol_replays_with_delta_carried_then_dropped():
    model, twin = tiny_model("bert"), tiny_model("bert")
    step = advfunc.free_at(model, epsilon=0.05, replays=3)
    by_hand = advfunc.free_at(twin, epsilon=0.05)
    params, twin_params = advfunc.params_of(model), advfunc.params_of(twin)
    state = step.init(params)
    assert step.replays == 3
    for batch in _batches(2):
        delta = None  # each batch's first replay starts from zero
        for _ in range(step.replays):
            grads, out, state = step.update(params, batch, state)
            expected, expected_out = by_hand(twin_params, batch, delta)
            delta = expected_out.delta
            torch.testing.assert_close(out.delta, delta, rtol=0, atol=0)
            for name, value in expected.items():
                torch.testing.assert_close(grads[name], value, rtol=0, atol=0, msg=name)
            _sgd(model, grads)
            _sgd(twin, expected)
            state = step.after_update(state, params)
        assert state == {"delta": None, "replay": 0}, "the next batch must start from δ = 0"


def test_the_protocol_refuses_a_state_that_init_did_not_make():
    model = tiny_model("bert")
    step = advfunc.free_at(model, epsilon=0.05)
    with pytest.raises(TypeError, match=r"step\.init\(params\)"):
        step.update(advfunc.params_of(model), padded_batch("bert"), None)


@pytest.mark.parametrize(
    "factory,message",
    [(partial(advfunc.smart, beta=1.5), "beta"), (partial(advfunc.free_at, replays=0), "replays")],
)
def test_the_state_options_are_checked_by_their_factories(factory, message):
    with pytest.raises(ValueError, match=message):
        factory(tiny_model("bert"))


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True)
    return TrainingArguments(**{**settings, **overrides})


def _examples(count: int) -> list[dict[str, torch.Tensor]]:
    batch = padded_batch("bert", batch=count, num_labels=2)
    return [{k: v[i] for k, v in batch.items()} for i in range(count)]


def test_the_trainer_points_state_options_to_the_factory(tmp_path):
    model = tiny_model("bert", num_labels=2)
    common = dict(model=model, args=_args(tmp_path), train_dataset=_examples(4), data_collator=default_data_collator)
    with pytest.raises(TypeError, match=r"partial\(advfunc\.smart, beta="):
        AdversarialTrainer(**common, step_factory=partial(advfunc.smart), beta=0.9)
    with pytest.raises(ValueError, match="beta"):
        AdversarialTrainer(**common, step_factory="pgd", beta=0.9)
    trainer = AdversarialTrainer(**common, step_factory="smart", beta=0.5)
    assert trainer._current_step()[1].config["beta"] == 0.5


class _Recording(AdversarialTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def test_the_trainer_drives_a_stateful_factory_of_its_own(tmp_path):
    """A callable factory's SMART step gets its teacher from the protocol, like a spec's."""
    model = tiny_model("bert", num_labels=2)
    twin = copy.deepcopy(model)
    trainer = _Recording(
        model=model,
        args=_args(
            tmp_path, max_steps=2, learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0
        ),
        train_dataset=_examples(4),
        data_collator=default_data_collator,
        step_factory=partial(advfunc.smart, epsilon=0.01, step_size=0.01, noise_var=0.0, beta=0.5),
    )
    trainer.train()
    step = advfunc.smart(twin, epsilon=0.01, step_size=0.01, noise_var=0.0)
    params = advfunc.params_of(twin)
    teacher = advfunc.teacher_of({n: p for n, p in twin.named_parameters() if p.requires_grad})
    assert len(trainer.seen) == 2
    for batch in trainer.seen:
        grads, _ = step(params, batch, teacher)
        _sgd(twin, grads, lr=0.1)
        teacher = advfunc.ema(teacher, params, 0.5)
    for name, value in teacher.items():
        torch.testing.assert_close(trainer.method_state()["teacher"][name], value, rtol=1e-5, atol=1e-6, msg=name)
