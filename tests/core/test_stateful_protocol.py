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
from tests.support.tiny_decoders import completion_batch, tiny_decoder
from tests.support.tiny_models import padded_batch, tiny_model


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


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(tiny_decoder("llama"), config)


def test_lat_retain_kl_carries_the_starting_model_as_its_reference():
    """With LoRA started at B = 0 the reference is the base model with its adapters disabled."""
    model = _lora_llama()
    step = advfunc.lat(model, layers="base_model.model.model.layers.0", epsilon=1.0, alpha=0.5, steps=2, retain_kl=True)
    params = advfunc.params_of(model)
    state = step.init(params)
    reference = state["reference"]
    assert sorted(reference) == sorted(advfunc.trainable_names(model))
    batch = completion_batch("right", adversary=True)
    plain_batch = {k: v for k, v in batch.items() if k != "adv_labels"}
    with torch.no_grad():
        referenced = torch.func.functional_call(model, {**params, **reference}, (), plain_batch).logits
        with model.disable_adapter():
            base = model(**plain_batch).logits
    torch.testing.assert_close(referenced, base, rtol=0, atol=0)
    grads, _, after = step.update(params, batch, state)
    expected, _ = step(params, batch, reference)
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)  # training moves θ; the reference stays where it started
    assert step.after_update(after, params)["reference"] is reference
    assert all(not torch.equal(reference[n], params[n]) for n in reference)


def test_lat_retain_kl_is_checked():
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match="retain > 0"):
        advfunc.lat(model, retain=0.0, retain_kl=True)
    assert not advfunc.lat(model).carries_state


def test_the_trainer_gives_lat_its_reference_under_lora(tmp_path):
    """``"lat:retain_kl=true"``: the Trainer keeps the starting adapters (B = 0: the base model) as the reference."""
    model = _lora_llama()
    base = model.get_base_model()
    twin_params = {n: p.detach().clone() for n, p in advfunc.params_of(base).items()}
    rows = completion_batch("right", adversary=True)
    trainer = AdversarialTrainer(
        model=model,
        args=_args(tmp_path, max_steps=1, per_device_train_batch_size=3, remove_unused_columns=False),
        train_dataset=[{k: v[i] for k, v in rows.items()} for i in range(3)],
        data_collator=default_data_collator,
        step_factory="lat:epsilon=1.0,alpha=0.5,steps=2,retain_kl=true",
    )
    trainer.train()
    reference = trainer.method_state()["reference"]
    assert sorted(reference) == sorted(advfunc.trainable_names(base))
    for name, value in reference.items():
        torch.testing.assert_close(value, twin_params[name], rtol=0, atol=0, msg=name)
