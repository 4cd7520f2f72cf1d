"""Representation rerouting against a hand computation on an independent copy of the base model.

The reference hidden states come from a second tiny Llama built from the same seed
without adapters, so the test checks that the step's own reference (the adapted model
with its adapters disabled) really is the base model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advfunc
from advfunc.methods.registry import METHODS, build_step, parse_method
from tests.support.method_harness import PassCounter
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_decoders import completion_batch, tiny_decoder, tiny_lora_decoder

LAYERS = ["model.layers.0", "model.layers.1"]
PEFT_LAYERS = [f"base_model.model.{name}" for name in LAYERS]


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    batch = completion_batch("left", seed=seed)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "harmful": torch.tensor([1, 0, 1]),
    }


def _states(model, names, batch):
    seen = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)
        )
        for name in names
    ]
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return [seen[name] for name in names]


def _by_hand(model, batch, reroute=1.0, retain=1.0):
    """(grads, L_rr, L_ret) with h_ref from a fresh base model and ordinary autograd on the LoRA model."""
    with torch.no_grad():
        reference = _states(tiny_decoder("llama"), LAYERS, batch)
    model.zero_grad(set_to_none=True)
    hidden = _states(model, PEFT_LAYERS, batch)
    real = batch["attention_mask"].bool()
    harmful = batch["harmful"].bool()
    cut, kept = real & harmful[:, None], real & ~harmful[:, None]
    rr = torch.stack(
        [F.relu(F.cosine_similarity(h, r, dim=-1))[cut].mean() for h, r in zip(hidden, reference, strict=True)]
    ).mean()
    ret = torch.stack([(h - r).norm(dim=-1)[kept].mean() for h, r in zip(hidden, reference, strict=True)]).mean()
    (reroute * rr + retain * ret).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads, rr.detach(), ret.detach()


def test_loss_and_grads_equal_the_hand_computation():
    model = tiny_lora_decoder()
    step = advfunc.rerouting(model, layers=PEFT_LAYERS, reroute=0.7, retain=1.3)
    batch = _batch()
    grads, out = step(advfunc.params_of(model), batch)
    expected, rr, ret = _by_hand(model, batch, 0.7, 1.3)
    assert 0 < float(rr) < 1 and float(ret) > 0, (
        "the adapters must move the hidden states for this test to mean anything"
    )
    torch.testing.assert_close(out.adv_loss, rr, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, ret, rtol=1e-5, atol=1e-7)
    assert set(grads) == set(expected) and all("lora_" in name for name in grads)
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(value.abs().max()) > 0 for value in grads.values())


def test_the_reference_is_adapter_free_a_zero_lora_starts_at_cos_one_and_no_retain_loss():
    model = tiny_lora_decoder(init=True)  # peft's default: B = 0, so the adapted model is the base model
    step = advfunc.rerouting(model, layers=PEFT_LAYERS)
    _, out = step(advfunc.params_of(model), _batch())
    torch.testing.assert_close(out.adv_loss, torch.tensor(1.0), rtol=0, atol=1e-6)
    assert float(out.loss) == 0.0


def test_rerouting_trains_the_harmful_states_away_and_keeps_the_retained_ones():
    model = tiny_lora_decoder()
    step = advfunc.rerouting(model, layers=PEFT_LAYERS[-1])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    params, batch = advfunc.params_of(model), _batch()
    _, first = step(params, batch)
    for _ in range(30):
        grads, out = step(params, batch)
        advfunc.set_grads(model, grads)
        optimizer.step()
    assert float(out.adv_loss) < 0.5 * float(first.adv_loss)


def test_rerouting_is_pure_and_costs_one_pass_and_one_forward():
    model = tiny_lora_decoder()
    step = advfunc.rerouting(model, layers=PEFT_LAYERS)
    params, batch = advfunc.params_of(model), _batch()
    assert_step_is_pure(model, lambda: step(params, batch), params, batch)
    with PassCounter(model) as counter:  # the loss reads hidden states: its backward never reaches the logits
        step(params, batch)
    assert (counter.forwards, counter.backwards) == (2, 1)
    assert step.passes == 1 and step.config["forward_only_passes"] == 1


def test_a_frozen_adapter_stays_frozen():
    model = tiny_lora_decoder()
    frozen = next(p for n, p in model.named_parameters() if "lora_A" in n)
    frozen.requires_grad_(False)
    step = advfunc.rerouting(model, layers=PEFT_LAYERS)
    step(advfunc.params_of(model), _batch())
    assert not frozen.requires_grad


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no PEFT adapter layers; wrap it"):
        advfunc.rerouting(tiny_decoder("llama"), layers=LAYERS)
    with pytest.raises(ValueError, match="both 0"):
        advfunc.rerouting(tiny_lora_decoder(), layers=PEFT_LAYERS, reroute=0.0, retain=0.0)
    model = tiny_lora_decoder()
    step = advfunc.rerouting(model, layers=PEFT_LAYERS)
    with pytest.raises(ValueError, match=r"batch\['harmful'\]"):
        step(advfunc.params_of(model), {k: v for k, v in _batch().items() if k != "harmful"})


def test_rerouting_is_registered_and_built_from_a_spec():
    assert METHODS["rerouting"].batch_keys == (advfunc.HARMFUL,)
    step = build_step(parse_method(f"rerouting:layers={PEFT_LAYERS[1]},reroute=0.5"), tiny_lora_decoder())
    assert step.config == {"layers": [PEFT_LAYERS[1]], "reroute": 0.5, "retain": 1.0, "forward_only_passes": 1}


def test_the_adapted_base_model_gives_the_same_step_as_its_peft_wrapper():
    """The Trainer runs steps on ``get_base_model()``, whose layers have the plain names."""
    model = tiny_lora_decoder()
    batch = _batch()
    wrapped, _ = advfunc.rerouting(model, layers=PEFT_LAYERS)(advfunc.params_of(model), batch)
    base = model.get_base_model()
    grads, _ = advfunc.rerouting(base, layers=LAYERS)(advfunc.params_of(base), batch)
    assert len(grads) == len(wrapped) > 0
    for name, value in grads.items():
        torch.testing.assert_close(wrapped[f"base_model.model.{name}"], value, rtol=0, atol=0, msg=name)
