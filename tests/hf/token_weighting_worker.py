"""One rank of the two-process token-weighting check in tests/hf/test_token_weighting.py.

Run under ``torchrun --nproc_per_node 2 tests/hf/token_weighting_worker.py OUT_DIR``: for
each method of the test, one optimizer step of two micro-batches of one example on each
rank (the four examples of the test, uneven completions, each example's noise its own);
the gradients it hands the optimizer saved to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from advfunc.hf import AdversarialTrainer
from tests.hf.test_token_weighting import STEPS, GradsBeforeStep, _examples, collator, example_noise
from tests.support.tiny_decoders import tiny_decoder


def one_step(method: str, out: Path) -> list[dict[str, torch.Tensor]]:
    model = tiny_decoder("llama")
    model.config.use_cache = False
    recorder = GradsBeforeStep(model)
    trainer = AdversarialTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / method),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            max_steps=1,
            max_grad_norm=0.0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            ddp_backend="gloo",
            remove_unused_columns=False,  # the collator takes the fields it needs
        ),
        train_dataset=_examples(),
        data_collator=collator(method),
        callbacks=[recorder],
        step_factory=STEPS[method],
    )
    trainer.train()
    return recorder.grads


def main(out: Path) -> None:
    with example_noise():
        grads = {method: one_step(method, out) for method in STEPS}
    torch.save({"world": dist.get_world_size(), "grads": grads}, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    dist.destroy_process_group()  # left to interpreter shutdown, gloo can abort the process after its work
