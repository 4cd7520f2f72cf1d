"""Token-weighted gradient accumulation: micro-batches weighted as Trainer weighs a causal LM's loss.

The oracle is one large batch holding the same examples: the model's mean loss over all
their completion tokens (plain), or PGD on the embedding output at that batch, whose
per-example δ does not depend on which examples share its batch. With completions of
uneven length, per-micro-batch weighting (1/A) would differ from it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import advfunc
from advfunc.hf import AdversarialTrainer
from advfunc.methods.plain import plain
from tests.support.tiny_decoders import VOCAB, tiny_decoder
from tests.support.torchrun import ROOT, run_torchrun

# (prompt length, completion length): micro-batches of two hold 2 + 9 and 12 + 1 completion tokens
EXAMPLES = [(3, 2), (2, 9), (4, 12), (5, 1)]


def _examples() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt, completion in EXAMPLES:
        ids = torch.randint(3, VOCAB, (prompt + completion,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right padding to the longest row; labels −100 at the padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class GradsBeforeStep(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


STEPS = {
    "none": plain,
    "pgd embeds": lambda m: advfunc.pgd(m, epsilon=0.5, alpha=0.2, steps=2, target="embeds"),
}


@pytest.mark.parametrize("method", sorted(STEPS))
def test_accumulated_micro_batches_equal_one_large_batch_per_token(tmp_path, method):
    model = tiny_decoder("llama")
    model.config.use_cache = False
    twin = copy.deepcopy(model)
    recorder = GradsBeforeStep(model)
    trainer = AdversarialTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=1,
            max_grad_norm=0.0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
        ),
        train_dataset=_examples(),
        data_collator=_collate,
        callbacks=[recorder],
        step_factory=STEPS[method],
    )
    # the order the sampler deals the examples in: one large batch of the same four
    order = list(trainer._get_train_sampler(trainer.train_dataset))
    trainer.train()
    big = _collate([_examples()[i] for i in order])
    expected, _ = STEPS[method](twin)(advfunc.params_of(twin), big)
    (grads,) = recorder.grads
    flat = torch.cat([grads[n].flatten() for n in sorted(expected)])
    oracle = torch.cat([expected[n].flatten() for n in sorted(expected)])
    torch.testing.assert_close(flat, oracle, rtol=1e-5, atol=1e-7)
    # and not what per-micro-batch weighting would give: the lengths are uneven enough
    halves = [_collate([_examples()[i] for i in order[k : k + 2]]) for k in (0, 2)]
    per_batch = sum(
        torch.cat([g[n].flatten() for n in sorted(g)]) / 2
        for g in (STEPS[method](twin)(advfunc.params_of(twin), h)[0] for h in halves)
    )
    assert float((per_batch - oracle).norm() / oracle.norm()) > 1e-2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saved: {"world": 2, "grads": {method: [the step's gradient]}}."""
    out = tmp_path_factory.mktemp("token_weighting")
    run_torchrun(ROOT / "tests" / "hf" / "token_weighting_worker.py", str(out), processes=2, timeout_s=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(STEPS))
def test_two_processes_weigh_their_micro_batches_per_token_too(ranks, method):
    """Two gloo processes, two micro-batches of one example each: the step's gradient is the large batch's."""
    twin = tiny_decoder("llama")
    twin.config.use_cache = False
    expected, _ = STEPS[method](twin)(advfunc.params_of(twin), _collate(_examples()))
    oracle = torch.cat([expected[n].flatten() for n in sorted(expected)])
    for saved in ranks:
        (grads,) = saved["grads"][method]
        assert saved["world"] == 2
        flat = torch.cat([grads[n].flatten() for n in sorted(expected)])
        torch.testing.assert_close(flat, oracle, rtol=1e-5, atol=1e-7)
