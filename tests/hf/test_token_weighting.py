"""Token-weighted gradient accumulation: micro-batches weighted as Trainer weighs a causal LM's loss.

The oracle is one large batch holding the same examples: the method's step on it, whose
terms are means over all the batch's completion tokens (the adversary's, for CAT's and
LAT's away term) and whose perturbation of each example does not depend on which examples
share its batch. With completions of uneven length, per-micro-batch weighting (1/A)
would differ from it.

VAT, SMART and R3F draw noise of the batch's shape, so a batch of other examples would
draw other numbers for the same example. Here the draws come from :func:`example_noise`:
each example's noise from a generator seeded by its length (the four examples' lengths
differ), the same numbers in any batch. The test then checks the weighting of the KL
terms, not the draws; CAT and LAT start from δ = 0 and draw nothing.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import advfunc
from advfunc.core.targets import Layout
from advfunc.hf import AdversarialTrainer
from advfunc.methods.plain import plain
from tests.support.tiny_decoders import VOCAB, tiny_decoder
from tests.support.torchrun import ROOT, run_torchrun

# (prompt length, completion length, the adversary's completion length): micro-batches of
# two hold 2 + 9 and 12 + 1 completion tokens, and 7 + 1 and 3 + 6 of the adversary's
EXAMPLES = [(3, 2, 7), (2, 9, 1), (4, 12, 3), (5, 1, 6)]


def _examples() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt, completion, adversary in EXAMPLES:
        ids = torch.randint(3, VOCAB, (prompt + completion,), generator=g).tolist()
        other = torch.randint(3, VOCAB, (adversary,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "adv_labels": [-100] * prompt + other})
    return rows


def _collate(rows: list[dict[str, list[int]]], adversary: bool = False) -> dict[str, torch.Tensor]:
    """Right padding to the longest row; labels −100 at the padding; ``adv_labels`` too with ``adversary``."""
    keys = ("input_ids", "adv_labels") if adversary else ("input_ids",)
    width = max(len(r[k]) for r in rows for k in keys)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    adv_labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
        if adversary:
            adv_labels[i, : len(row["adv_labels"])] = torch.tensor(row["adv_labels"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {**batch, "adv_labels": adv_labels} if adversary else batch


def _per_example(draw: Callable[[tuple[int, int], torch.Generator], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A noise function like advfunc.core.noise's whose draw for each row depends on that row alone."""

    def noise(
        layout: Layout, scale: float, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor:
        assert layout.mask is not None
        out = torch.zeros(layout.shape, dtype=dtype)
        for row, real in enumerate(layout.mask[..., 0].bool().cpu()):
            length = int(real.sum())  # the example's length names it: the four differ
            out[row, real] = draw((length, layout.shape[-1]), torch.Generator().manual_seed(length)).to(dtype) * scale
        return out.to(device)

    return noise


@contextlib.contextmanager
def example_noise() -> Iterator[None]:
    """VAT's, SMART's and R3F's draws from :func:`_per_example`: N(0, I) and U(−1, 1), scaled as theirs."""
    gaussian = _per_example(lambda shape, g: torch.randn(shape, generator=g))
    uniform = _per_example(lambda shape, g: torch.rand(shape, generator=g) * 2 - 1)
    patches = [("vat", "gaussian", gaussian), ("smart", "gaussian", gaussian), ("r3f", "gaussian", gaussian)]
    patches.append(("r3f", "uniform", uniform))
    with pytest.MonkeyPatch.context() as patch:
        for module, name, function in patches:
            patch.setattr(importlib.import_module(f"advfunc.attacks.{module}"), name, function)
        yield


class GradsBeforeStep(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


STEPS = {
    "none": plain,
    "pgd embeds": lambda m: advfunc.pgd(m, epsilon=0.5, alpha=0.2, steps=2, target="embeds"),
    "vat": lambda m: advfunc.vat(m, epsilon=0.5, xi=0.1),
    "smart": lambda m: advfunc.smart(m, epsilon=0.05, step_size=0.02, noise_var=0.01),
    "r3f": lambda m: advfunc.r3f(m, sigma=0.05),
    "cat": lambda m: advfunc.cat(m, epsilon=0.5, alpha=0.2, steps=2, away=10.0),
    "lat": lambda m: advfunc.lat(m, layers="model.layers.0", epsilon=0.5, alpha=0.2, steps=2, away=10.0),
}
ADVERSARY = ("cat", "lat")  # the batch carries the adversary's completion


def collator(method: str) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    return partial(_collate, adversary=method in ADVERSARY)


def step_grads(method: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The method's step on ``batch`` from the start of training (a stateful method's state as at step one), flat."""
    step = advfunc.stateful(STEPS[method](model))
    params = advfunc.params_of(model)
    grads = step.update(params, batch, step.init(params))[0]
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


@pytest.mark.parametrize("method", sorted(STEPS))
def test_accumulated_micro_batches_equal_one_large_batch_per_token(tmp_path, method):
    model = tiny_decoder("llama")
    model.config.use_cache = False
    twin = copy.deepcopy(model)
    recorder = GradsBeforeStep(model)
    with example_noise():
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
                remove_unused_columns=False,  # the collator takes the fields it needs
            ),
            train_dataset=_examples(),
            data_collator=collator(method),
            callbacks=[recorder],
            step_factory=STEPS[method],
        )
        # the order the sampler deals the examples in: one large batch of the same four
        order = list(trainer._get_train_sampler(trainer.train_dataset))
        trainer.train()
        oracle = step_grads(method, twin, collator(method)([_examples()[i] for i in order]))
        # and not what per-micro-batch weighting would give: the lengths are uneven enough
        halves = [collator(method)([_examples()[i] for i in order[k : k + 2]]) for k in (0, 2)]
        per_half = [step_grads(method, twin, h) for h in halves]
    (grads,) = recorder.grads
    flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
    torch.testing.assert_close(flat, oracle, rtol=1e-5, atol=1e-7)
    assert float((sum(per_half) / 2 - oracle).norm() / oracle.norm()) > 1e-2
    if method in ADVERSARY:
        # the labelled tokens' share alone would weigh the away term wrongly (away=10 makes it matter)
        shares = [int(h["labels"].ne(-100).sum()) for h in halves]
        labels_share = sum(g * n / sum(shares) for g, n in zip(per_half, shares, strict=True))
        assert float((labels_share - oracle).norm() / oracle.norm()) > 1e-4  # ten times the tolerance


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saved: {"world": 2, "grads": {method: [the step's gradient]}}."""
    out = tmp_path_factory.mktemp("token_weighting")
    run_torchrun(ROOT / "tests" / "hf" / "token_weighting_worker.py", str(out), processes=2, timeout_s=300)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(STEPS))
def test_two_processes_weigh_their_micro_batches_per_token_too(ranks, method):
    """Two gloo processes, two micro-batches of one example each: the step's gradient is the large batch's."""
    twin = tiny_decoder("llama")
    twin.config.use_cache = False
    with example_noise():
        oracle = step_grads(method, twin, collator(method)(_examples()))
    for saved in ranks:
        (grads,) = saved["grads"][method]
        assert saved["world"] == 2
        flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
        torch.testing.assert_close(flat, oracle, rtol=1e-5, atol=1e-7)
