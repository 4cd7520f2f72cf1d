"""TRL's SFTTrainer with an advfunc step: chat template, packing, completion-only loss, LoRA, NEFTune, CAT batches.

A tiny Llama and a word-level tokenizer with a chat template of its own. The oracles are
independent of the Trainer: each optimizer step's gradient (clipping off) equals the
advfunc step (or the model's own loss) run by hand on the batch TRL's collator made.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset  # installed with trl (the trl extra)
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.neftune import neftune_post_forward_hook
from trl import SFTConfig, SFTTrainer

import advfunc
from advfunc.hf import AdversarialTrainer, ChatAdversaryCollator, adversarial
from advfunc.methods.plain import plain
from tests.support.tiny_decoders import tiny_decoder

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":", "END"] + [f"w{i}" for i in range(60)]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} END {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _words(g: torch.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (n,), generator=g))


def _chat(count: int = 12, adversary: bool = False) -> list[dict]:
    """Prompt-completion chat examples with uneven prompt and completion lengths."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(count):
        row = {
            "prompt": [{"role": "user", "content": _words(g, 2 + k % 4)}],
            "completion": [{"role": "assistant", "content": _words(g, 1 + (3 * k) % 5)}],
        }
        if adversary:
            row["adversary"] = _words(g, 1 + (2 * k) % 3)
        rows.append(row)
    return rows


class GradsBeforeStep(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def _recording(cls):
    class Recording(cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def _sft(tmp_path, packing: bool, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        packing=packing,
        padding_free=packing,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        save_strategy="no",
        max_length=64,
        bf16=False,  # SFTConfig's default autocasts to bf16 where supported; the oracles here are fp32
    )
    return SFTConfig(**{**settings, **overrides})


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    x = torch.cat([a[k].flatten() for k in sorted(a)])
    y = torch.cat([b[k].flatten() for k in sorted(a)])
    return float((x - y).norm() / y.norm())


STEPS = {
    "none": plain,
    "pgd embeds": lambda m: advfunc.pgd(m, epsilon=0.5, alpha=0.2, steps=2, target="embeds"),
}


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("method", sorted(STEPS))
def test_sft_trainer_steps_equal_the_step_by_hand_on_trls_batches(tmp_path, packing, method):
    tokenizer = _tokenizer()
    model = tiny_decoder("llama")
    twin = copy.deepcopy(model)
    recorder = GradsBeforeStep(model)
    trainer = _recording(adversarial(SFTTrainer))(
        model=model,
        args=_sft(tmp_path, packing),
        train_dataset=Dataset.from_list(_chat()),
        processing_class=tokenizer,
        callbacks=[recorder],
        step_factory=STEPS[method],
    )
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) == 2 and len(recorder.grads) == 2
    # As SFTTrainer sets it: with a cache, transformers skips finding the packed sequences in
    # position_ids, and each token would attend to the sequences packed before it.
    twin.config.use_cache = False
    step = STEPS[method](twin)
    optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, (2 - t) / 2))
    for batch, grads in zip(trainer.seen, recorder.grads, strict=True):
        labels, ids = batch["labels"], batch["input_ids"]
        if packing:
            starts = (batch["position_ids"][0] == 0).sum()
            assert ids.shape[0] == 1 and starts >= 4, "one row packing several sequences, positions restarting"
        # completion-only: every labelled token follows the template's "assistant :"
        assistant = tokenizer.convert_tokens_to_ids("assistant")
        first = (labels != -100) & (torch.nn.functional.pad(labels, (1, 0), value=-100)[:, :-1] == -100)
        assert bool(first.any()) and bool((ids[:, :-2][first[:, 2:]] == assistant).all())
        expected, _ = step(advfunc.params_of(twin), batch)
        assert _rel(grads, expected) <= 1e-5
        advfunc.set_grads(twin, expected)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def test_sft_trainer_with_lora_trains_the_adapters_only(tmp_path):
    model = tiny_decoder("llama")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = adversarial(SFTTrainer)(
        model=model,
        args=_sft(tmp_path, packing=True, gradient_checkpointing=True),
        train_dataset=Dataset.from_list(_chat()),
        processing_class=_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        step_factory="pgd:epsilon=0.5,alpha=0.2,steps=2,target=embeds",
    )
    trainer.train()
    named = dict(trainer.model.named_parameters())
    adapters = [n for n, p in named.items() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters)
    assert any(float(named[n].detach().abs().sum()) > 0 for n in adapters if "lora_B" in n), "LoRA's B never moved"
    for name, value in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, frozen[key]), name


def _packed_batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    total = sum(lengths)
    ids = torch.randint(3, 120, (1, total), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


def test_neftune_under_packing_scales_by_each_sequence_not_the_packed_row():
    """NEFTune (Jain et al.): noise α/√(n·d)·U(−1, 1) with n the example's own length.

    On one packed row of three sequences, transformers' built-in hook scales by the row's
    length; advfunc's scale is each sequence's, as the paper's formula asks.
    """
    alpha, lengths = 5.0, [4, 6, 22]
    model = tiny_decoder("llama")
    batch = _packed_batch(lengths)
    hidden = model.config.hidden_size
    delta = advfunc.attacks.neftune(model, alpha=alpha, generator=torch.Generator().manual_seed(0))(
        advfunc.params_of(model), batch
    )  # [1, L, H]
    embedding = model.get_input_embeddings()
    embedding.neftune_noise_alpha = alpha
    clean = embedding(batch["input_ids"])
    builtin = neftune_post_forward_hook(embedding, (batch["input_ids"],), clean) - clean  # [1, L, H]
    start = 0
    for n in lengths:
        ours = delta[0, start : start + n].abs().max() / (alpha / math.sqrt(n * hidden))
        theirs = builtin[0, start : start + n].abs().max() / (alpha / math.sqrt(n * hidden))
        assert 0.9 < float(ours) <= 1.0, f"sequence of {n}: the paper's bound, nearly reached by {n * hidden} draws"
        packed = math.sqrt(n / sum(lengths))  # the built-in scale in units of the per-sequence one
        assert 0.9 * packed < float(theirs) <= packed * (1 + 1e-6)
        start += n
    assert float(packed) < 0.9  # the last sequence is the longest: the two scales still differ there


def test_trainers_own_neftune_is_refused_beside_an_advfunc_step(tmp_path):
    with pytest.raises(ValueError, match=r'step_factory="neftune:alpha=5'):
        adversarial(SFTTrainer)(
            model=tiny_decoder("llama"),
            args=_sft(tmp_path, packing=True, neftune_noise_alpha=5.0),
            train_dataset=Dataset.from_list(_chat()),
            processing_class=_tokenizer(),
            step_factory="neftune",
        )


def test_adversarial_refuses_what_is_not_a_trainer_class():
    with pytest.raises(TypeError, match="Trainer subclass"):
        adversarial(object)
    assert adversarial(SFTTrainer) is adversarial(SFTTrainer)
    assert adversarial(AdversarialTrainer) is AdversarialTrainer
    assert adversarial(Trainer) is AdversarialTrainer


def test_the_chat_collator_builds_cat_batches_on_the_template():
    tokenizer = _tokenizer()
    examples = _chat(3, adversary=True)
    batch = ChatAdversaryCollator(tokenizer, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape[1] % 8 == 0
    for row, example in enumerate(examples):
        prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        p = len(prompt.split())
        reply = [*example["completion"][0]["content"].split(), "END"]
        adversary = [*example["adversary"].split(), "END"]
        ids = batch["input_ids"][row]
        assert tokenizer.convert_ids_to_tokens(ids[:p].tolist()) == prompt.split()
        assert tokenizer.convert_ids_to_tokens(batch["labels"][row, p : p + len(reply)].tolist()) == reply
        assert bool((batch["labels"][row, :p] == -100).all()) and bool(
            (batch["labels"][row, p + len(reply) :] == -100).all()
        )
        adv = batch["adv_labels"][row]
        assert tokenizer.convert_ids_to_tokens(adv[p : p + len(adversary)].tolist()) == adversary
        assert int((adv != -100).sum()) == len(adversary)
        assert int(batch["attention_mask"][row].sum()) == p + len(reply)


def test_the_chat_collator_refuses_a_tokenizer_without_a_template_and_a_prompt_too_long():
    tokenizer = _tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ChatAdversaryCollator(tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        ChatAdversaryCollator(_tokenizer(), max_length=3)(_chat(1, adversary=True))


@pytest.mark.parametrize("method", ["cat:epsilon=0.5,alpha=0.1,steps=2", "lat:epsilon=1.0,alpha=0.5,steps=2"])
def test_cat_and_lat_train_from_a_chat_dataset_through_the_collator(tmp_path, method):
    tokenizer = _tokenizer()
    model = tiny_decoder("llama")
    twin = copy.deepcopy(model)
    recorder = GradsBeforeStep(model)
    trainer = _recording(AdversarialTrainer)(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=3,
            report_to=[],
            use_cpu=True,
            max_grad_norm=0.0,
            remove_unused_columns=False,
            save_strategy="no",
        ),
        train_dataset=Dataset.from_list(_chat(6, adversary=True)),
        data_collator=ChatAdversaryCollator(tokenizer),
        callbacks=[recorder],
        step_factory=method,
    )
    trainer.seen = []
    trainer.train()
    name, _, options = method.partition(":")
    factory = getattr(advfunc, name)
    kwargs = {k: (int(v) if k == "steps" else float(v)) for k, v in (o.split("=") for o in options.split(","))}
    step = factory(twin, **kwargs)
    batch = trainer.seen[0]
    expected, out = step(advfunc.params_of(twin), batch)
    assert not bool(out.skipped)
    assert _rel(recorder.grads[0], expected) <= 1e-5
