"""Tiny random causal LMs of three families and completion-only batches, padded left or right."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 120
HIDDEN = 32
DECODERS = ("llama", "gpt2", "qwen2")
# The second (last) decoder layer of each family: a module target.
LAYER = {"llama": "model.layers.1", "gpt2": "transformer.h.1", "qwen2": "model.layers.1"}


def tiny_decoder(family: str, seed: int = 0) -> PreTrainedModel:
    """A 2-layer causal LM, hidden 32, vocabulary 120, pad id 0, dropout off, in train mode."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if family == "llama":
        model: PreTrainedModel = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
                **common,
            )
        )
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=HIDDEN,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **common,
            )
        )
    elif family == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=True,
                **common,
            )
        )
    else:
        raise ValueError(f"unknown family {family!r}; one of {DECODERS}")
    return model.train()


# The projections LoRA adapts in each family (GPT-2's are Conv1D, stored transposed).
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn"],
}


def tiny_lora_decoder(family: str = "llama", seed: int = 0, init: bool = False) -> PeftModel:
    """:func:`tiny_decoder` with rank-4 LoRA on :data:`LORA_TARGETS`; ``init=False`` draws B at random.

    With a random B the adapters change the hidden states from the first step, as after
    some training; ``init=True`` is peft's B = 0, the base model exactly. The base
    weights are ``tiny_decoder(family, seed)``'s.
    """
    base = tiny_decoder(family, seed=seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LORA_TARGETS[family],
        lora_dropout=0.0,
        init_lora_weights=init,
        fan_in_fan_out=family == "gpt2",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed + 7)  # the adapters' draw
    return get_peft_model(base, config)


def completion_batch(padding: str, seed: int = 0, adversary: bool = False) -> dict[str, torch.Tensor]:
    """Three rows of 10 positions: a prompt, a completion (the only labelled tokens), padding.

    ``adversary``: add ``adv_labels``, another completion of the same length at the
    completion's positions.
    """
    g = torch.Generator().manual_seed(seed)
    width, lengths, prompts = 10, [10, 7, 5], [6, 4, 3]
    ids = torch.randint(3, VOCAB, (3, width), generator=g)
    other = torch.randint(3, VOCAB, (3, width), generator=g)
    mask = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100)
    adv_labels = torch.full((3, width), -100)
    for row, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        start = 0 if padding == "right" else width - n
        mask[row, start : start + n] = 1
        completion = slice(start + p, start + n)
        labels[row, completion] = ids[row, completion]
        adv_labels[row, completion] = other[row, completion]
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}
    if adversary:
        batch["adv_labels"] = adv_labels
    return batch


def prompt_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] bool: real tokens whose label is −100."""
    return batch["attention_mask"].bool() & (batch["labels"] == -100)
