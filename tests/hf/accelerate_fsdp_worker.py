"""One rank of the GPU check of ``AdversarialTrainer`` under accelerate's FSDP2 in tests/hf/test_fsdp_trainer.py.

Run under ``torchrun --nproc_per_node 2 tests/hf/accelerate_fsdp_worker.py OUT_DIR`` on a
machine with two or more CUDA devices (one per rank, NCCL). For each case of
:data:`CASES` (the CPU test's, but SFTTrainer's, whose data preparation the test's
tokenized examples do not go through) a tiny Llama trains one optimizer step through
``trainer.train()`` with ``fsdp=True, fsdp_config={"version": 2}``: accelerate applies
``fully_shard`` to each decoder layer and the root, and the Trainer's data loader deals
the token-weighting test's four examples to two micro-batches of one on each rank. Each
rank saves the gathered gradients the optimizer read and the gathered parameters after
the step to ``OUT_DIR/rank{r}.pt``, with whether the Trainer ran FSDP2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from advfunc.hf import AdversarialTrainer
from advfunc.scale.fsdp import is_sharded
from tests.hf import fsdp_trainer_worker
from tests.hf.fsdp_trainer_worker import ACCUMULATE, LR, whole
from tests.hf.test_token_weighting import _collate, _examples
from tests.scale.fsdp_worker import model_for

CASES = {case: spec for case, spec in fsdp_trainer_worker.CASES.items() if not case.startswith("sft")}


class Record(TrainerCallback):
    """The gathered gradients the optimizer reads, and whether they and the parameters are sharded."""

    def __init__(self) -> None:
        self.trainer: AdversarialTrainer | None = None
        self.grads: dict[str, torch.Tensor] = {}
        self.sharded = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        assert self.trainer is not None
        target = self.trainer.adversarial_model()
        self.sharded = is_sharded(self.trainer.model) and all(
            isinstance(p.grad, DTensor) for p in target.parameters() if p.grad is not None
        )
        self.grads = {n: whole(p.grad).cpu() for n, p in target.named_parameters() if p.grad is not None}


def run(case: str, out: Path) -> dict:
    model, _ = model_for(case)
    record = Record()
    trainer = AdversarialTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / case),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=ACCUMULATE,
            max_steps=1,
            max_grad_norm=0.0,
            optim="sgd",
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            fsdp=True,
            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=_examples(),
        data_collator=_collate,
        callbacks=[record],
        step_factory=CASES[case],
    )
    record.trainer = trainer
    trainer.train()
    return {
        "fsdp2": trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2,
        "sharded": record.sharded,
        "grads": record.grads,
        "params": {n: whole(p).cpu() for n, p in trainer.adversarial_model().named_parameters()},
        "world": trainer.args.world_size,
    }


def main(out: Path) -> None:
    results = {case: run(case, out) for case in CASES}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
