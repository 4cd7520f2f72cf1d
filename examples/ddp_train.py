"""Data-parallel adversarial training with advfunc on torch.distributed.

Launch one process per GPU (NCCL) or a few on CPU (gloo)::

    torchrun --nproc_per_node 2 examples/ddp_train.py --method pgd --precision bf16
    torchrun --nproc_per_node 2 examples/ddp_train.py --method freelb --precision fp16 --accumulate 2

Each rank runs the pure step on its shard of the batch; the inner ascent passes never
communicate. Per optimizer step there is exactly one bucketed gradient all-reduce
(``advfunc.distributed.all_reduce_grads``), after accumulation, then the fp16 overflow
check, then ``optimizer.step()``. Without ``--model`` it trains a tiny random BERT on a
synthetic bag-of-words task, so it runs offline in seconds; with
``--model DIR`` it fine-tunes a local Hugging Face checkpoint on the same task.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import advfunc
from advfunc.scale import distributed as advdist
from advfunc.scale import precision
from advfunc.scale.accumulation import accumulate, split_batch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("fgm", "pgd", "freelb"), default="pgd")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank, per optimizer step")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    # The classic ε = 1 suits BERT-base, whose embedding rows have norm ≈ 1; the tiny model's are ≈ 0.15.
    parser.add_argument("--epsilon", type=float, default=0.1, help="FGM/PGD radius (PGD's α = 0.3 ε)")
    parser.add_argument("--bucket-mb", type=float, default=advdist.DEFAULT_BUCKET_MB)
    parser.add_argument("--model", default=None, help="a local Hugging Face checkpoint directory (default: tiny BERT)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_model(path: str | None, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if path is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        config = BertConfig(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
        )
        model = BertForSequenceClassification(config)
    return model.to(device)


def synthetic_data(vocab: int, n: int = 4096, length: int = 24, seed: int = 0) -> TensorDataset:
    """A bag-of-words "sentiment" task: class c draws 75% of its tokens from word list c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    half = (min(vocab, 1000) - 10) // 2  # ids 10..: two word lists of `half` ids each
    own = torch.rand(n, length, generator=g) < 0.75
    word_list = torch.where(own, labels[:, None], 1 - labels[:, None])
    ids = 10 + word_list * half + torch.randint(0, half, (n, length), generator=g)
    ids[:, 0] = 2  # a fixed first token, standing in for [CLS]
    return TensorDataset(ids, torch.ones_like(ids), labels)


def make_step(method: str, model: torch.nn.Module, epsilon: float, autocast: torch.dtype | None) -> advfunc.Step:
    if method == "fgm":
        return advfunc.fgm(model, epsilon=epsilon, autocast=autocast)
    if method == "pgd":
        return advfunc.pgd(model, epsilon=epsilon, alpha=0.3 * epsilon, steps=3, autocast=autocast)
    return advfunc.freelb(model, steps=3, lr=0.05, init_mag=0.0, autocast=autocast)


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed + rank)  # ranks differ on purpose: broadcast_parameters must align them

    model = build_model(args.model, device)
    # Wrapped in DDP (or by accelerate.prepare)? Build the step on advdist.unwrap(model) instead.
    advdist.broadcast_parameters(model)  # what DDP's constructor does: every rank starts from rank 0's weights
    params = advfunc.params_of(model)  # shares storage: it sees every optimizer update, no need to rebuild
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    step = make_step(args.method, model, args.epsilon, autocast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scale = precision.init_loss_scale(device=device) if args.precision == "fp16" else None

    data = synthetic_data(model.config.vocab_size, seed=args.seed)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    calls = 0
    all_reduce = dist.all_reduce

    def counted(*a, **k):  # counts the collectives, to show there is one per bucket per optimizer step
        nonlocal calls
        calls += 1
        return all_reduce(*a, **k)

    dist.all_reduce = counted
    done, epoch, start = 0, 0, time.perf_counter()
    while done < args.steps:
        sampler.set_epoch(epoch)
        for ids, mask, labels in loader:
            batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
            calls = 0
            grads, acc = accumulate(
                step,
                params,
                split_batch(batch, args.accumulate),
                reduction="mean",
                loss_scale=scale.scale if scale is not None else 1.0,
            )
            grads = advdist.all_reduce_grads(grads, bucket_mb=args.bucket_mb)
            applied = True
            if scale is not None:
                grads, finite, scale = precision.unscale_and_check(grads, scale)
                applied = bool(finite)  # the one host sync of the step, as with GradScaler
            if applied:
                advfunc.set_grads(model, grads)
                optimizer.step()
            done += 1
            if rank == 0 and (done % 10 == 0 or done == 1):
                extra = f" scale {scale.scale.item():.0f}" if scale is not None else ""
                print(
                    f"step {done:4d} loss {acc.loss.item():.4f} adv {acc.adv_loss.item():.4f} "
                    f"all_reduce calls {calls}{' (skipped: overflow)' if not applied else ''}{extra}",
                    flush=True,
                )
            if done >= args.steps:
                break
        epoch += 1
    dist.all_reduce = all_reduce

    in_sync = advdist.replicas_agree(params)
    if rank == 0:
        per_step = (time.perf_counter() - start) / args.steps
        print(
            f"{world} ranks, {args.method}, {args.precision}: {per_step * 1000:.0f} ms/step, replicas agree: {in_sync}"
        )
    dist.barrier()  # no rank tears its gloo pairs down while a peer still talks to it
    dist.destroy_process_group()
    if not in_sync:
        raise SystemExit("replicas drifted apart")


if __name__ == "__main__":
    main()
