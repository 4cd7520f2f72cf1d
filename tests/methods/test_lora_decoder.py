"""A tiny Llama with LoRA adapters (PEFT): the decoder methods train the adapter weights only."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import advfunc
from tests.support.tiny_decoders import completion_batch, tiny_decoder


def _lora_llama():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(tiny_decoder("llama"), config)


STEPS = {
    "cat": lambda m: advfunc.cat(m, epsilon=0.5, alpha=0.1, steps=2),
    "lat": lambda m: advfunc.lat(m, layers="base_model.model.model.layers.0", epsilon=1.0, alpha=0.5, steps=2),
    "pgd": lambda m: advfunc.pgd(m, epsilon=1.0, alpha=0.5, steps=2, target="embeds"),
}


@pytest.mark.parametrize("method", sorted(STEPS))
def test_only_adapter_weights_train(method):
    model = _lora_llama()
    trainable = advfunc.trainable_names(model)
    assert trainable and all("lora_" in name for name in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step = STEPS[method](model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for t in range(2):
        batch = completion_batch("left" if t else "right", seed=t, adversary=method != "pgd")
        grads, out = step(advfunc.params_of(model), batch)
        assert sorted(grads) == sorted(trainable)
        assert all(bool(torch.isfinite(g).all()) for g in grads.values()) and not bool(out.skipped)
        advfunc.set_grads(model, grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, value in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(value, frozen_before[name]), name
    # LoRA's B starts at zero; a trained adapter has moved it.
    assert any(not torch.equal(p, adapters_before[n]) for n, p in model.named_parameters() if "lora_B" in n)
