"""Fine-tuning from the command line on :class:`advfunc.hf.AdversarialTrainer`, which runs the loop and its resume.

Added here: batches grouped by length, the task head's own learning rate, one checkpoint folder
written atomically, the check that a resumed run has the same settings and data, each step's loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Sampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from advfunc.app.common import checkpoint, report
from advfunc.app.common.data import Encoded, training_batches
from advfunc.app.common.flags import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, option
from advfunc.app.common.progress import Progress
from advfunc.app.common.word_attacks import shared_sentence_encoder, shared_wordnet
from advfunc.core.arguments import require_non_negative, require_positive, require_steps
from advfunc.hf import AdversarialTrainer, atomic
from advfunc.hf.loading import packaged_minilm
from advfunc.methods.registry import MethodSpec, parse_method
from advfunc.words.augment import A2TConfig

log = logging.getLogger("advfunc")
POOLINGS = ("cls", "mean")
FORMAT = 2  # advfunc_state.json's format: 2 since the loop is Trainer's (1 had advfunc's own training state)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run; a resumed run must use the same ones."""

    method: str = "none"  # a method spec: "pgd" or "pgd:epsilon=0.5,steps=2"
    epochs: int = option(1, COUNT, "epochs")
    batch_size: int = option(32, COUNT, "batch size per process")
    grad_accum: int = option(1, COUNT, "micro-batches per optimizer step")
    lr: float = option(5e-5, POSITIVE, "peak learning rate")
    head_lr: float | None = option(None, POSITIVE, "peak learning rate of the task head (default: --lr)")
    warmup_ratio: float = option(0.1, FRACTION, "share of steps warming up")
    weight_decay: float = option(0.01, NON_NEGATIVE, "AdamW weight decay")
    max_grad_norm: float = option(1.0, NON_NEGATIVE, "clip norm (0: off)")
    max_length: int = 64
    seed: int = 0
    pooling: Literal["cls", "mean"] = option(
        "cls", help="the task head reads the model's own head (cls) or the mean token state (mean: sentence encoders)"
    )
    a2t: A2TConfig | None = None  # A2T's word-substitution examples mixed into each batch (None: off)

    def check(self) -> MethodSpec:
        """Validate every field; return the parsed method spec."""
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            require_steps(name.replace("_", "-"), getattr(self, name))
        require_positive("lr", self.lr)
        if self.head_lr is not None:
            require_positive("head-lr", self.head_lr)
        if not require_non_negative("warmup-ratio", self.warmup_ratio) < 1:
            raise ValueError(f"warmup-ratio must be a finite number in [0, 1), got {self.warmup_ratio!r}")
        require_non_negative("weight-decay", self.weight_decay)
        require_non_negative("max-grad-norm", self.max_grad_norm)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.a2t is not None:
            self.a2t.check()
        return parse_method(self.method)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on biases and LayerNorm weights (BERT recipe). The task head
    (outside ``model.base_model``, new when fine-tuning starts) learns at ``head_lr``: Adam moves each weight by
    about its learning rate per step, so a new head may need a larger one."""
    norm_params = {id(p) for module in model.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()}
    base = getattr(model, "base_model", model)
    body = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) and base is not model else None
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = not (name.endswith("bias") or id(param) in norm_params)
            groups.setdefault((decays, body is not None and id(param) not in body), []).append(param)
    param_groups = [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": (head_lr or lr) if head else lr}
        for (decays, head), params in groups.items()
    ]
    try:  # one fused kernel over all parameters (docs/main_job.md: the per-tensor loop's cost)
        return torch.optim.AdamW(param_groups, lr=lr, fused=True)
    except RuntimeError:  # torch < 2.4 fuses on CUDA only
        return torch.optim.AdamW(param_groups, lr=lr)


def training_arguments(config: TrainConfig, output: Path | None = None, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` for ``config`` and ``overrides``; under ``torchrun`` this joins the process group."""
    config.check()
    gpu = torch.cuda.is_available()
    settings: dict[str, Any] = dict(  # output_dir: Trainer only creates it; the checkpoint is renamed into it
        output_dir=str(output.parent) if output is not None else tempfile.gettempdir(), seed=config.seed,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs, learning_rate=config.lr, lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        average_tokens_across_devices=False,  # the step's loss is a per-batch mean: no per-step token gather
        dataloader_pin_memory=gpu, use_cpu=not gpu,
    )  # fmt: skip
    return TrainingArguments(**{**settings, **overrides})


def padded(batch: dict[str, torch.Tensor], pad_id: int, multiple: int = 16, limit: int = 0) -> dict[str, torch.Tensor]:
    """``batch``'s ``[B, L]`` entries right-padded to a multiple of ``multiple`` columns, not past ``limit`` (0: none).
    A compiled step specialises the length inside ``torch.func.grad``: one graph per length would hit dynamo's
    recompile limit, multiples of 16 make ⌈max length / 16⌉. New columns are masked: no loss or gradient changes."""
    width = batch["input_ids"].shape[1]
    target = -(-width // multiple) * multiple
    if limit:
        target = min(target, max(width, limit))
    if target == width:
        return batch
    fill = {k: pad_id if k == "input_ids" else 0 for k in batch}
    return {k: F.pad(v, (0, target - width), value=fill[k]) if v.dim() == 2 else v for k, v in batch.items()}


class LengthGroupedOrder(Sampler[int]):
    """One epoch's order: the batches of :func:`~advfunc.app.common.data.training_batches` one after another.

    Similar lengths keep padding small; the short batch goes last, so ``batch_size`` pieces are the batches.
    It depends on (seed, epoch) only: a resumed epoch is the same. ``batch_size`` is the global batch, cut
    into the processes' shares after grouping (as one process of that size sees it)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        batches = training_batches(self.lengths, self.batch_size, self.seed, self.epoch)
        batches.sort(key=lambda batch: len(batch) < self.batch_size)  # stable: full batches keep their order
        for batch in batches:
            yield from batch


class _LengthGrouped(Trainer):
    """Trainer drawing examples in :class:`LengthGroupedOrder` (a replaying method wraps this order)."""

    lengths: Sequence[int] = ()
    order: LengthGroupedOrder | None = None

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int] | None:
        # Over the global batch, which accelerate deals out one per-process batch each.
        self.order = LengthGroupedOrder(self.lengths, self._train_batch_size * self.args.world_size, self.args.seed)
        return self.order


class _CommandLineTrainer(AdversarialTrainer, _LengthGrouped, TrainerCallback):
    """``AdversarialTrainer`` with length-grouped batches and one atomic checkpoint folder; as its own callback,
    per optimizer step: the loss (into ``run_state``), the steps' time, the progress line, saving and stopping."""

    def __init__(
        self, *args: Any, lengths: Sequence[int], output: Path | None, state: dict[str, Any], save_every: int,
        stop_after: int | None, progress: bool, **kwargs: Any,
    ) -> None:  # fmt: skip
        self.lengths, self.output, self.seconds, self.mark = lengths, output, 0.0, 0.0
        self.run_state = state  # advfunc_state.json: settings, data fingerprint, losses (a resumed run's first)
        self.resumed_from = len(state["losses"])
        self.save_every, self.stop_after, self.progress = save_every, stop_after, progress
        self._loss: torch.Tensor | None = None
        self.bar: Progress | None = None
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)  # it prints Trainer's final metrics to stdout
        self.add_callback(self)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._loss = loss if self._loss is None else self._loss + loss  # over micro-batches: the step's mean loss
        return loss

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The run's folder: Trainer's files, the method's state, ``advfunc_state.json`` last; staged by process 0
        and renamed into place once every process wrote its state, so ``--output`` is one complete checkpoint."""
        assert self.output is not None
        self.store_flos()
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        losses = torch.tensor(self.run_state["losses"], dtype=torch.float64)
        if several:  # each process trained on its own shard: the run's loss is their mean
            dist.all_reduce(losses)
            losses /= dist.get_world_size()
        main = self.args.process_index == 0
        step, total = self.state.global_step, self.state.max_steps
        with atomic.directory(self.output) if main else contextlib.nullcontext(None) as staged:
            folder = [str(staged)]
            if several:
                dist.broadcast_object_list(folder, src=0)
            tmp = Path(folder[0])
            self.save_model(str(tmp), _internal_call=True)  # process 0: weights, config, tokenizer
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))  # every process: rng_state[_RANK].pth
            if method := self.method_state():
                torch.save(method, self._method_file(tmp))
            if several:
                dist.barrier()
            if main:
                self.state.save_to_json(str(tmp / TRAINER_STATE_NAME))
                files = sorted([*(entry.name for entry in tmp.iterdir()), checkpoint.STATE_FILE])
                document = {**self.run_state, "losses": losses.tolist(), "step": step, "total_steps": total}
                document.update(finished=step >= total, files=files)
                text = json.dumps(document, indent=2, sort_keys=True) + "\n"
                (tmp / checkpoint.STATE_FILE).write_text(text, encoding="utf-8")
        if main:
            log.info("checkpoint at step %d of %d written to %s", step, total, self.output)
        self.mark = time.perf_counter()  # the steps' time leaves out the checkpoints

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        shown = self.progress and state.is_world_process_zero
        self.bar = Progress(state.max_steps, f"train {self.run_state['method']}", shown, state.global_step)
        self.mark = time.perf_counter()
        if self.resumed_from:
            log.info("resuming %s from step %d of %d", self.output, state.global_step, state.max_steps)

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        # accelerate's set_epoch does not reach a sampler under both its shard and skip wrappers
        # (several processes, resumed mid-epoch): the order's epoch comes from the state here.
        if self.order is not None:
            self.order.set_epoch(int(state.epoch or 0))

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        now, step = time.perf_counter(), state.global_step
        self.seconds += now - self.mark
        self.mark = now
        loss, self._loss = (float("nan") if self._loss is None else float(self._loss)), None  # one host sync
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {step}; lower --lr")
        self.run_state["losses"].append(loss)
        assert self.bar is not None
        self.bar.update(loss=loss)
        if self.output is None:
            return
        per_epoch = state.max_steps // max(1, int(args.num_train_epochs))
        stopping = self.stop_after is not None and self.stop_after <= step < state.max_steps
        periodic = self.save_every > 0 and step % self.save_every == 0
        if stopping or periodic or step % per_epoch == 0 or step >= state.max_steps:
            control.should_save = True
        if stopping:
            control.should_training_stop = True
            log.info("stopping at step %d of %d as asked; continue with --resume", step, state.max_steps)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__()


def train(
    model: nn.Module, tokenizer: Any, data: Encoded, config: TrainConfig, *, output: Path | None = None,
    resume: bool = False, data_fingerprint: str = "", save_every: int = 0, stop_after: int | None = None,
    progress: bool = True, extra_state: Mapping[str, Any] | None = None, arguments: TrainingArguments | None = None,
    compile: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune ``model`` (it ends on the CPU): the report's training entry, with ``step`` counting a resume's too.
    ``resume``: go on from the checkpoint in ``output`` that ``model`` was loaded from (same settings, data,
    processes). Checkpoints: after each epoch, every ``save_every`` steps (0: never), at ``stop_after`` (stopping
    there, in the full run's schedule), at the end. ``compile=False``: eager CUDA steps (same results)."""
    spec = config.check()
    if len(data) == 0:
        raise ValueError("the training set is empty")
    if resume and output is None:
        raise ValueError("resume needs the checkpoint directory (output)")
    arguments = arguments or training_arguments(config, output)
    settings = {"format": FORMAT, "method": spec.label, "config": asdict(config), "data": data_fingerprint}
    losses: list[float] = []
    if resume and output is not None:  # the checkpoint's losses go on, if it has these settings and data
        saved = checkpoint.read_state(output)
        if saved is None:
            raise checkpoint.CheckpointError(f"{output} holds no advfunc checkpoint to resume")
        if saved.get("format") != FORMAT:
            raise checkpoint.CheckpointError(
                f"{output} was written by another advfunc version (checkpoint format {saved.get('format')!r}, "
                f"this one reads {FORMAT}); train again without --resume"
            )
        old = {**saved.get("config", {}), "processes": saved.get("processes")}
        now = {**asdict(config), "processes": arguments.world_size}
        changes = [f"{key}: checkpoint {old.get(key)!r}, now {now[key]!r}" for key in now if old.get(key) != now[key]]
        changes += ["the training data differ"] * (saved.get("data") != data_fingerprint)
        if changes:
            raise checkpoint.CheckpointError(
                f"cannot resume {output}: the settings differ from the checkpoint's ({'; '.join(changes)}); "
                "resume with the same settings, or train into a new --output"
            )
        losses = list(saved.get("losses", []))
    state = {**settings, "processes": arguments.world_size, "losses": losses, **(extra_state or {})}
    compiled = compile and arguments.device.type == "cuda"  # where steps compile: a few widths, a few graphs
    a2t: dict[str, Any] = {}
    if config.a2t is not None:  # the similarity bound's encoder is all-MiniLM-L6-v2's (none when the bound is off)
        folder, bounded = str(packaged_minilm()), config.a2t.attack.similarity > -1
        encoder = shared_sentence_encoder(folder, config.max_length, arguments.device) if bounded else None
        a2t = dict(augmentation=config.a2t, sentence_encoder=encoder, wordnet=shared_wordnet())

    def collate(ids: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = data.batch(ids)
        return padded(batch, data.pad_id, 16, config.max_length) if compiled else batch

    trainer = _CommandLineTrainer(
        model=model, args=arguments, processing_class=tokenizer, step_factory=config.method,
        train_dataset=list(range(len(data))), data_collator=collate,  # example i is its index: `data` holds it
        optimizers=(make_optimizer(model, config.lr, config.weight_decay, config.head_lr), None),
        compile=None if compile else False, lengths=data.lengths(), output=output, state=state,
        save_every=save_every, stop_after=stop_after, progress=progress, **a2t,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(output) if resume else None)
    model.to("cpu")
    step, total = trainer.state.global_step, trainer.state.max_steps
    cost = trainer.augmentation_cost  # this invocation's, as the seconds
    a2t_cost = {} if cost is None else {"a2t": cost.as_dict()}
    return report.training_summary(
        losses,
        step - trainer.resumed_from,
        trainer.seconds,
        total_steps=total,
        step=step,
        passes=trainer.step.passes,
        **a2t_cost,
    )
