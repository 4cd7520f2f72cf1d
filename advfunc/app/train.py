"""The training loop: advfunc's pure steps, ``set_grads`` and a ``torch.optim`` optimizer.

Each optimizer step: the method's step computes the gradients of one or more
micro-batches from the parameter dict, ``set_grads`` writes their mean into ``p.grad``,
the gradient norm is clipped, AdamW steps and the learning rate follows linear warmup
then linear decay to zero (Hugging Face's ``get_linear_schedule_with_warmup``).
Checkpoints are atomic and carry everything needed to resume exactly: optimizer,
scheduler, random-number state and the position in the epoch's batch order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advfunc.app import checkpoint
from advfunc.app.data import Encoded, training_batches
from advfunc.app.progress import Progress
from advfunc.core.arguments import require_non_negative, require_positive
from advfunc.core.params import Params, params_of, set_grads
from advfunc.core.step import Grads, Step, StepOutput, all_finite
from advfunc.methods.registry import MethodSpec, build_step, draws_noise, parse_method, seeded_generator

log = logging.getLogger("advfunc")
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one fine-tuning run; a resumed run must use the same ones."""

    method: str = "none"  # a method spec: "pgd" or "pgd:epsilon=0.5,steps=2"
    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    head_lr: float | None = None  # the task head's peak learning rate; None: lr
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 turns clipping off
    max_length: int = 64
    seed: int = 0
    pooling: str = "cls"  # what the head reads: "cls" (the model's own head) or "mean" (advfunc.app.mean_pooled)

    def check(self) -> MethodSpec:
        """Validate every field; return the parsed method spec."""
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        require_positive("lr", self.lr)
        if self.head_lr is not None:
            require_positive("head-lr", self.head_lr)
        if not require_non_negative("warmup-ratio", self.warmup_ratio) < 1:
            raise ValueError(f"warmup-ratio must be a finite number in [0, 1), got {self.warmup_ratio!r}")
        require_non_negative("weight-decay", self.weight_decay)
        require_non_negative("max-grad-norm", self.max_grad_norm)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        spec = parse_method(self.method)
        if spec.method.driver == "replay" and self.grad_accum != 1:
            raise ValueError(f"{spec.name} replays each batch with an optimizer step in between; use grad-accum 1")
        return spec


@dataclass
class TrainResult:
    """What a run did: steps, wall time of the steps (not of saving) and losses."""

    method: str
    step: int  # optimizer steps done, counting those before a resume
    total_steps: int
    resumed_from: int
    seconds: float  # wall time of the optimizer steps run in this process
    losses: list[float] = field(default_factory=list)  # mean training loss of each optimizer step

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def steps_run(self) -> int:
        return self.step - self.resumed_from

    @property
    def time_per_step(self) -> float:
        return self.seconds / self.steps_run if self.steps_run else float("nan")

    @property
    def steps_per_second(self) -> float:
        return self.steps_run / self.seconds if self.seconds > 0 else float("nan")


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: 0 → 1 over ``warmup`` steps, then linearly to 0 at ``total`` (HF's formula)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on biases and LayerNorm weights (BERT recipe).

    The task head (the parameters outside ``model.base_model``: a classifier initialised
    at random when fine-tuning starts) learns at ``head_lr`` (None: ``lr``). Adam moves
    each weight by about its learning rate per step, so a random head at an encoder's
    rate of 2e-4 barely turns in a few dozen steps and the model answers one class; the
    short comparison gives it 1e-2.
    """
    norm_params = {id(p) for module in model.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()}
    base = getattr(model, "base_model", model)
    body = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) and base is not model else None
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (name.endswith("bias") or id(param) in norm_params)
        in_head = body is not None and id(param) not in body
        groups.setdefault((decays, in_head), []).append(param)
    head = lr if head_lr is None else head_lr
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": head if in_head else lr}
            for (decays, in_head), params in groups.items()
        ],
        lr=lr,
    )


def refuse_non_finite(spec: MethodSpec, grads: Grads) -> None:
    """Raise ``FloatingPointError`` rather than let inf/NaN gradients reach the weights."""
    if not bool(all_finite(grads)):
        raise FloatingPointError(
            f"{spec.label} produced non-finite gradients from finite inputs; lower its radii or step sizes (or --lr)"
        )


class _Driver:
    """Runs a method's step on one unit of work (a group of micro-batches) and steps the optimizer.

    Subclasses differ only in how they call the step and what state they carry.
    """

    replays = 1

    def __init__(self, spec: MethodSpec, step: Step, model: nn.Module, params: Params, update: Callable[[], None]):
        self.spec = spec
        self.step = step
        self.model = model
        self.params = params
        self.update = update  # clip + optimizer.step + scheduler.step + zero_grad

    def call(self, batch: Mapping[str, Any]) -> tuple[Grads, StepOutput]:
        return self.step(self.params, batch)

    def run(self, micro: Sequence[Mapping[str, Any]]) -> list[float]:
        """One optimizer step on the mean gradient of ``micro``; the mean loss of each step."""
        losses = []
        for i, batch in enumerate(micro):
            grads, out = self.call(batch)
            refuse_non_finite(self.spec, grads)
            if len(micro) > 1:  # a mean of micro-batch means, as Trainer does without num_items_in_batch
                grads = {n: g.mul_(1.0 / len(micro)) for n, g in grads.items()}
            set_grads(self.model, grads, accumulate=i > 0)
            losses.append(float(out.loss))
        self.update()
        self.after_update()
        return [sum(losses) / len(losses)]

    def after_update(self) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        return None


class _TeacherDriver(_Driver):
    """SMART: ``step(params, batch, teacher)``; θ̃ ← β·θ̃ + (1−β)·θ after each optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from advfunc.methods.teacher import teacher_of

        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.beta = float(self.spec.driver_option("beta"))
        self.teacher = teacher_of({n: v for n, v in self.params.items() if n in trainable})

    def call(self, batch: Mapping[str, Any]) -> tuple[Grads, StepOutput]:
        return self.step(self.params, batch, self.teacher)

    def after_update(self) -> None:
        from advfunc.methods.teacher import ema

        self.teacher = ema(self.teacher, self.params, self.beta)

    def state(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.teacher = dict(state["teacher"])


class _ReplayDriver(_Driver):
    """Free AT: each batch replayed m times, δ carried between replays, an optimizer step after each."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replays = int(self.spec.driver_option("replays"))
        if self.replays < 1:
            raise ValueError(f"{self.spec.name}: replays must be >= 1, got {self.replays}")

    def run(self, micro: Sequence[Mapping[str, Any]]) -> list[float]:
        (batch,) = micro
        delta = None  # batches differ in shape: every batch starts from δ = 0
        losses = []
        for _ in range(self.replays):
            grads, out = self.step(self.params, batch, delta)
            refuse_non_finite(self.spec, grads)
            set_grads(self.model, grads)
            losses.append(float(out.loss))
            self.update()
            delta = out.delta
        return losses


_DRIVERS: dict[str, type[_Driver]] = {"batch": _Driver, "teacher": _TeacherDriver, "replay": _ReplayDriver}


class Loop:
    """Optimizer steps for one method: step → ``set_grads`` (micro-batch mean) → clip → AdamW → schedule.

    ``run(micro_batches)`` does one unit of work (one optimizer step, or ``replays`` of
    them for free AT) and returns the loss of each optimizer step. ``total_units`` sizes
    the learning-rate schedule. ``train`` drives it over epochs; a test or a custom data
    pipeline can feed it batches directly.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, total_units: int) -> None:
        self.spec = config.check()
        self.config = config
        self.model = model
        self.params = params_of(model)  # shares storage: the optimizer's in-place updates show through
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, config.head_lr)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # The loop holds the method's generator so that a checkpoint can carry its state:
        # re-seeding it on resume would repeat the noise of the first steps.
        self.generator = seeded_generator(model, config.seed) if draws_noise(self.spec) else None
        step = build_step(self.spec, model, generator=self.generator)
        self.driver = _DRIVERS[self.spec.method.driver](self.spec, step, model, self.params, self._update)
        self.total_steps = total_units * self.driver.replays
        warmup = round(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, self.total_steps))

    @property
    def replays(self) -> int:
        return self.driver.replays

    def _update(self) -> None:
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, micro_batches: Sequence[Mapping[str, Any]]) -> list[float]:
        return self.driver.run(micro_batches)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "driver": self.driver.state(),
            **({"method_rng": self.generator.get_state()} if self.generator is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.driver.load_state(state.get("driver", {}))
        torch.set_rng_state(state["rng"])
        if self.generator is not None:
            if "method_rng" not in state:
                raise checkpoint.CheckpointError(
                    f"the checkpoint lacks the random state of {self.spec.name}'s noise, so resuming it would not "
                    "be exact; train again without --resume"
                )
            self.generator.set_state(state["method_rng"])


def _config_changes(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    now = asdict(config)
    return [f"{key}: checkpoint {saved.get(key)!r}, now {now[key]!r}" for key in now if saved.get(key) != now[key]]


def train(
    model: nn.Module,
    tokenizer: Any,
    data: Encoded,
    config: TrainConfig,
    *,
    output: Path | None = None,
    resume: bool = False,
    data_fingerprint: str = "",
    save_every: int = 0,
    stop_after: int | None = None,
    progress: bool = True,
    extra_state: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` with ``config.method``; checkpoint to ``output``.

    ``resume=True`` continues the checkpoint in ``output`` (the caller loaded ``model``
    from it): same settings and data required. Checkpoints are written at the end of each
    epoch, every ``save_every`` optimizer steps (0: never), at ``stop_after`` (stop there
    with a checkpoint, keeping the full run's schedule, to continue later) and at the end.
    """
    config.check()
    if len(data) == 0:
        raise ValueError("the training set is empty")
    if resume and output is None:
        raise ValueError("resume needs the checkpoint directory (output)")
    lengths = data.lengths()
    batches_per_epoch = len(training_batches(lengths, config.batch_size, config.seed, 0))
    units_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_units = units_per_epoch * config.epochs
    if not resume:
        torch.manual_seed(config.seed)
    loop = Loop(model, config, total_units)
    spec, total_steps = loop.spec, loop.total_steps

    start_unit, losses = 0, []
    if resume:
        assert output is not None
        state = checkpoint.read_state(output)
        if state is None:
            raise checkpoint.CheckpointError(f"{output} holds no advfunc checkpoint to resume")
        changes = _config_changes(state.get("config", {}), config)
        if state.get("data") != data_fingerprint:
            changes.append("the training data differ")
        if changes:
            raise checkpoint.CheckpointError(
                f"cannot resume {output}: the settings differ from the checkpoint's ({'; '.join(changes)}); "
                "resume with the same settings, or train into a new --output"
            )
        loop.load_state_dict(checkpoint.read_training(output))
        start_unit, losses = int(state["unit"]), list(state.get("losses", []))
        log.info("resuming %s from step %d of %d", output, start_unit * loop.replays, total_steps)

    result = TrainResult(spec.label, start_unit * loop.replays, total_steps, start_unit * loop.replays, 0.0, losses)

    def save(unit: int) -> None:
        if output is None:
            return
        state = {
            "format": 1,
            "method": spec.label,
            "config": asdict(config),
            "data": data_fingerprint,
            "unit": unit,
            "step": unit * loop.replays,
            "total_steps": total_steps,
            "finished": unit >= total_units,
            "losses": result.losses,
            "seconds": result.seconds,
            **(extra_state or {}),
        }
        checkpoint.save(output, model, tokenizer, state, loop.state_dict())
        log.info("checkpoint at step %d of %d written to %s", unit * loop.replays, total_steps, output)

    model.train()
    epoch_batches: tuple[int, list[list[int]]] | None = None
    with Progress(total_steps, f"train {spec.label}", progress, initial=result.step) as bar:
        for unit in range(start_unit, total_units):
            epoch, k = divmod(unit, units_per_epoch)
            if epoch_batches is None or epoch_batches[0] != epoch:
                epoch_batches = (epoch, training_batches(lengths, config.batch_size, config.seed, epoch))
            chunk = epoch_batches[1][k * config.grad_accum : (k + 1) * config.grad_accum]
            started = time.perf_counter()
            step_losses = loop.run([data.batch(indices) for indices in chunk])
            result.seconds += time.perf_counter() - started
            for loss in step_losses:
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {result.step + 1}; lower --lr")
                result.losses.append(loss)
                result.step += 1
                bar.update(loss=loss)
            done = unit + 1
            end_of_epoch = done % units_per_epoch == 0
            stopping = stop_after is not None and result.step >= stop_after
            periodic = save_every > 0 and result.step % save_every < loop.replays
            if end_of_epoch or stopping or periodic or done == total_units:
                save(done)
            if stopping and done < total_units:
                log.info("stopping at step %d of %d as asked; continue with --resume", result.step, total_steps)
                break
    return result
