"""One rank of the two-process ``AdversarialTrainer`` checks in tests/test_hf_distributed.py.

Run under ``torchrun --nproc_per_node 2 tests/hf_distributed_worker.py OUT_DIR``: every
method of :data:`METHODS` trains a tiny BERT through the Trainer (DDP over gloo, each rank
its share of every global batch), and each rank saves its final weights and the number
of ``all_reduce`` calls each optimizer step made to ``OUT_DIR/rank{r}.pt``. SMART and free
AT also train once more, resumed from a checkpoint taken mid-run, to the same end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advfunc.hf import AdversarialTrainer
from advfunc.scale.distributed import plan_buckets
from tests.support.tiny_models import padded_batch, tiny_model

PER_PROCESS = 2  # examples per micro-batch on each process
ACCUMULATE = 2
BUCKET_MB = 0.03  # the tiny BERT's 0.09 MiB of grads in several buckets
# Methods whose perturbation is per example (or per token) and draws no noise: the mean
# over shards of their gradient is the gradient over the global batch.
METHODS = {
    "fgm": "fgm:epsilon=0.1,target=embeds",
    "pgd": "pgd:alpha=0.05,epsilon=0.1,steps=2,target=embeds",
    "freelb": "freelb:lr=0.05,steps=2",
    "smart": "smart:noise_var=0.0,step_size=0.01,epsilon=0.01,beta=0.5",
    "free_at": "free_at:epsilon=0.05,replays=2",
}
RESUMED = ("smart", "free_at")


def examples(count: int = 16) -> list[dict[str, torch.Tensor]]:
    batch = padded_batch("bert", batch=count, length=10, seed=5, num_labels=2)
    return [{k: v[i] for k, v in batch.items()} for i in range(count)]


def max_steps(method: str) -> int:
    return 4 if method == "free_at" else 2


def arguments(output: Path, method: str, per_device: int, **overrides: Any) -> TrainingArguments:
    """The run's settings; one process takes ``per_device`` = 2 × PER_PROCESS to see the same global batches."""
    settings: dict[str, Any] = {
        "output_dir": str(output),
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": 1 if method == "free_at" else ACCUMULATE,
        "max_steps": max_steps(method),
        "optim": "sgd",  # Adam would turn rounding-level differences of zero gradients into steps of lr
        "learning_rate": 0.5,
        "lr_scheduler_type": "linear",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "train_sampling_strategy": "sequential",  # global batch t is the same on one process and on two
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "logging_strategy": "no",
        "remove_unused_columns": False,
        "ddp_bucket_cap_mb": BUCKET_MB,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def train(method: str, args: TrainingArguments, resume: str | None = None, callbacks=()) -> AdversarialTrainer:
    trainer = AdversarialTrainer(
        model=tiny_model("bert", num_labels=2),
        args=args,
        train_dataset=examples(),
        data_collator=default_data_collator,
        step_factory=METHODS[method],
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class CountAllReduce(TrainerCallback):
    """``all_reduce`` calls from each optimizer step's first micro-batch to just before ``optimizer.step()``."""

    def __init__(self) -> None:
        self.original = dist.all_reduce
        self.calls = 0
        self.per_step: list[int] = []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self.calls = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.per_step.append(self.calls)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    for method in METHODS:
        counter = CountAllReduce()
        dist.all_reduce = counter
        try:
            args = arguments(out / method, method, PER_PROCESS, save_strategy="steps", save_steps=1, ddp_backend="gloo")
            trainer = train(method, args, callbacks=[counter])
        finally:
            dist.all_reduce = counter.original
        model = trainer.model
        grads_like = {n: p for n, p in model.named_parameters() if p.requires_grad}
        record = {
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "calls": counter.per_step,
            "buckets": len(plan_buckets(grads_like, BUCKET_MB)),
            "tensors": len(grads_like),
            "world": dist.get_world_size(),
        }
        if method in RESUMED:
            # step 1 of free AT's 2 replays is mid-batch: the carried δ must come back too
            again = arguments(out / method, method, PER_PROCESS, ddp_backend="gloo")
            resumed = train(method, again, resume=str(out / method / "checkpoint-1"))
            record["resumed"] = {n: p.detach().clone() for n, p in resumed.model.named_parameters()}
        results[method] = record
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
