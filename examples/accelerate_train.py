"""The advfunc step under Hugging Face ``accelerate``: what to unwrap and what to skip.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py   # GPUs, NCCL
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/accelerate_train.py  # CPU, gloo

(``accelerate launch --cpu`` starts a single process unless MPI is set up; under
torchrun with ``ACCELERATE_USE_CPU=true`` accelerate uses gloo and wraps in DDP.)

``accelerator.prepare`` wraps the model in DDP when there are several processes. The
step is built on the bare module (``accelerator.unwrap_model`` or
``advfunc.distributed.unwrap``), never on the wrapper: the wrapper's reducer hooks the
model's own parameters, which an advfunc step does not differentiate, so
``accelerator.backward``, ``accelerator.accumulate`` and ``no_sync`` play no part.
Gradients are averaged by one bucketed ``all_reduce_grads`` per optimizer step.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

import advfunc
from advfunc.scale import distributed as advdist
from advfunc.scale.accumulation import accumulate, split_batch


def main() -> None:
    # Mixed precision: give the dtype to the advfunc factory (autocast=...), not to the
    # Accelerator; with mixed_precision="bf16" accelerate would also patch the module's
    # forward with autocast, which the unwrapped module keeps and the step then runs
    # (harmless, same result), but its fp16 GradScaler needs accelerator.backward.
    accelerator = Accelerator(mixed_precision="no")
    torch.manual_seed(0)  # same init on every rank; DDP's constructor broadcasts rank 0's anyway
    config = BertConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (1024,), generator=g)
    own = torch.rand(1024, 24, generator=g) < 0.75
    ids = (
        10
        + torch.where(own, labels[:, None], 1 - labels[:, None]) * 100
        + torch.randint(0, 100, (1024, 24), generator=g)
    )
    rows = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels, strict=True)
    ]
    loader = DataLoader(rows, batch_size=16, shuffle=True)

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # DDP-wrapped when world > 1
    core = advdist.unwrap(model)  # == accelerator.unwrap_model(model); the step needs the bare module
    accelerator.print(f"prepared: {type(model).__name__}, step built on: {type(core).__name__}")
    step = advfunc.pgd(core, epsilon=0.1, alpha=0.03, steps=3)
    params = advfunc.params_of(core)

    for index, batch in enumerate(loader):  # accelerate's loader already gives each rank its shard
        grads, acc = accumulate(step, params, split_batch(batch, 2), reduction="mean")
        if accelerator.num_processes > 1:
            grads = advdist.all_reduce_grads(grads)  # the only collective of the optimizer step
        advfunc.set_grads(core, grads)
        optimizer.step()
        if index % 16 == 0:
            loss = accelerator.gather(acc.loss.reshape(1)).mean()  # for the log only
            accelerator.print(f"step {index:3d} loss {loss.item():.4f} ({accelerator.num_processes} processes)")
    accelerator.print("replicas agree:", advdist.replicas_agree(params) if accelerator.num_processes > 1 else True)


if __name__ == "__main__":
    main()
