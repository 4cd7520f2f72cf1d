"""One rank of the CPU checks of ``AdversarialTrainer`` on an FSDP2 model in tests/hf/test_fsdp_trainer.py.

Run under ``torchrun --nproc_per_node 2 tests/hf/fsdp_trainer_worker.py OUT_DIR``. For each
case of :data:`CASES` a tiny Llama (LoRA on q and v for the "lora" case) is sharded per
decoder layer and at the root with ``fully_shard`` (gloo, CPU) and handed to an
``AdversarialTrainer`` (``adversarial(SFTTrainer)``, with TRL's gradient checkpointing,
for the "sft" case). accelerate applies FSDP only on GPU backends, so the Trainer's own
step is driven here as its training loop drives it: two accumulated micro-batches of
one example on each rank (the token-weighting test's four examples, uneven completions),
``num_items_in_batch`` counted by the Trainer over both ranks, then one SGD step of the
optimizer the Trainer builds on the sharded parameters. Each rank saves the gathered
gradients and parameters of the step's model to ``OUT_DIR/rank{r}.pt``; SMART (with its
EMA teacher, state kept whole) also saves its teacher after the step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from advfunc.hf import AdversarialTrainer, adversarial
from tests.hf.test_token_weighting import _collate, _examples
from tests.scale.fsdp_worker import model_for

LR = 0.1
ACCUMULATE = 2
CASES = {
    "pgd embeds": "pgd:epsilon=0.5,alpha=0.2,steps=2,target=embeds",
    "pgd layer": "pgd:epsilon=0.5,alpha=0.2,steps=2,target=model.layers.0",
    "lora pgd embeds": "pgd:epsilon=0.5,alpha=0.2,steps=2,target=embeds",
    # noise_var=0: δ₀ = 0, so the step is the same on one process and on two
    "smart": "smart:noise_var=0.0,step_size=0.01,epsilon=0.01,beta=0.5",
    "sft pgd embeds": "pgd:epsilon=0.5,alpha=0.2,steps=2,target=embeds",  # adversarial(SFTTrainer)
}


def micro_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank r's micro-batches: examples r and r + 2, one each."""
    rows = _examples()
    return [_collate([rows[rank + 2 * a]]) for a in range(ACCUMULATE)]


def whole(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()


def run(case: str, out: Path, rank: int) -> dict:
    model, prefix = model_for(case)
    if case.startswith("sft"):  # as SFTTrainer.train() turns it on (SFTConfig's default); here, before sharding
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder = model.get_base_model() if prefix else model
    for layer in decoder.model.layers:
        fully_shard(layer)
    fully_shard(model)
    settings = {
        "output_dir": str(out / case),
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": ACCUMULATE,
        "optim": "sgd",
        "learning_rate": LR,
        "weight_decay": 0.0,
        "report_to": [],
        "use_cpu": True,
        "ddp_backend": "gloo",
        "save_strategy": "no",
    }
    if case.startswith("sft"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from tests.hf.test_trl import _chat, _tokenizer

        trainer: AdversarialTrainer = adversarial(SFTTrainer)(
            model=model,
            args=SFTConfig(**settings, bf16=False),  # TRL's default is bf16
            processing_class=_tokenizer(),
            train_dataset=Dataset.from_list(_chat()),  # SFTTrainer prepares it; the steps below use their own batches
            step_factory=CASES[case],
        )
    else:
        trainer = AdversarialTrainer(model=model, args=TrainingArguments(**settings), step_factory=CASES[case])
    trainer.create_optimizer()
    batches = micro_batches(rank)
    count = trainer._get_num_items_in_batch(batches, torch.device("cpu"))  # over both ranks, as Trainer counts
    for a, batch in enumerate(batches):
        # Trainer's loop sets this per micro-batch: the last one of the optimizer step syncs
        trainer.accelerator.gradient_state._set_sync_gradients(a == ACCUMULATE - 1)
        trainer.training_step(trainer.model, batch, count)
    target = trainer.adversarial_model()
    grads = {n: whole(p.grad) for n, p in target.named_parameters() if p.grad is not None}
    sharded_grads = all(isinstance(p.grad, DTensor) for p in target.parameters() if p.grad is not None)
    trainer.optimizer.step()
    trainer.after_optimizer_step()
    teacher = trainer.method_state().get("teacher")
    return {
        "grads": grads,
        "sharded_grads": sharded_grads,
        "sharded_after": all(isinstance(p, DTensor) for p in target.parameters()),
        "params": {n: whole(p) for n, p in target.named_parameters()},
        "teacher": None if teacher is None else {n: t.clone() for n, t in teacher.items()},
        "world": trainer.args.world_size,
        "checkpointed": any(getattr(m, "gradient_checkpointing", False) for m in target.modules()),
        "count": float(count),
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.save({case: run(case, out, rank) for case in CASES}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
