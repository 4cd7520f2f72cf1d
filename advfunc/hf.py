"""Hugging Face ``Trainer`` integration: adversarial training with any advfunc step factory.

``AdversarialTrainer`` replaces only ``Trainer.training_step``. For each micro-batch it
runs the pure step, then hands the step's gradients to Trainer's own backward machinery
through a surrogate ``Σ ⟨θ, g⟩ / n_accum`` whose gradient with respect to θ is exactly
``g / n_accum``. Everything Trainer does around a backward therefore applies unchanged:
accumulation over micro-batches into ``p.grad``, the fp16 ``GradScaler`` (the surrogate
is scaled like a loss), clipping of the accumulated gradient, the optimizer and the
schedule. The step itself runs under ``accelerator.autocast()``, so ``bf16=True`` /
``fp16=True`` give the same mixed precision as Trainer's plain forward.

Gradient accumulation follows Trainer's rule for a per-batch mean loss: each
micro-batch's gradient is divided by the number of micro-batches in the step, so an
optimizer step sees the mean of the micro-batch gradients (``num_items_in_batch`` token
re-weighting is not applied; sequence classification has one item per example).

With a PEFT model (LoRA and the other adapter methods, not prompt learning) the step is
built on the adapted base model, whose forward takes every tokenizer output: only the
adapter weights (and ``modules_to_save``) have ``requires_grad``, so only they get
gradients, and ``target="embeds"`` needs no gradient of the frozen embedding matrix.

Example::

    from functools import partial
    trainer = AdversarialTrainer(
        model=model, args=TrainingArguments(...), train_dataset=train, data_collator=collator,
        step_factory=partial(advfunc.pgd, epsilon=1.0, alpha=0.3, steps=3, target="embeds"),
    )
    trainer.train()

Single process only: under DDP/FSDP the surrogate's backward does not run through the
wrapped module's forward, so no gradient all-reduce would happen (see advfunc.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from advfunc.core.params import params_of
from advfunc.core.step import Step, all_finite
from advfunc.methods.registry import build_step, parse_method

_DRIVEN = {
    "teacher": "step(params, batch, teacher) with an EMA teacher updated after each optimizer step",
    "replay": "step(params, batch, delta) replayed with an optimizer step between replays",
}


def _factory_from_spec(text: str) -> Callable[[nn.Module], Step]:
    spec = parse_method(text)
    return lambda model: build_step(spec, model)


class AdversarialTrainer(Trainer):
    """A ``Trainer`` whose training step is an advfunc method.

    ``step_factory(model) -> Step``, e.g. ``functools.partial(advfunc.fgm, epsilon=1.0)``
    or ``lambda m: advfunc.freelb(m, steps=2)``, or a method spec as the CLI takes it
    (``"pgd:epsilon=1.0,target=embeds"``). It is called once, on the model that the step
    differentiates (the base model of a PEFT adapter model). SMART (teacher) and free AT
    (replays) need a loop of their own and are refused here.
    """

    def __init__(self, *args: Any, step_factory: Callable[[nn.Module], Step] | str, **kwargs: Any) -> None:
        if isinstance(step_factory, str):
            step_factory = _factory_from_spec(step_factory)
        if not callable(step_factory):
            raise TypeError(f"step_factory must be callable as step_factory(model) -> Step, got {step_factory!r}")
        super().__init__(*args, **kwargs)
        self.step_factory = step_factory
        self._step: Step | None = None
        self._step_model: nn.Module | None = None
        self._current_step()  # refuse a step this Trainer cannot drive now, not at the first batch

    def adversarial_model(self) -> nn.Module:
        """The module the step runs on: the unwrapped model, or a PEFT model's adapted base model."""
        model = self.accelerator.unwrap_model(self.model)
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and hasattr(model, "get_base_model"):
            if getattr(peft_config, "is_prompt_learning", False):
                return model  # prompt tuning adds virtual tokens in PeftModel.forward: keep it
            base: nn.Module = model.get_base_model()
            return base
        return model

    def _current_step(self) -> tuple[nn.Module, Step]:
        target = self.adversarial_model()
        if self._step is None or self._step_model is not target:
            step = self.step_factory(target)
            if not isinstance(step, Step):
                raise TypeError(f"step_factory returned {type(step).__name__}, not an advfunc Step")
            if step.driver != "batch":
                # A replay step called as step(params, batch) trains with δ = None every time, i.e.
                # without a method; a teacher step needs its EMA teacher as a third argument.
                raise ValueError(
                    f"step_factory built a {step.method!r} step, driven by a {step.driver!r} loop "
                    f"({_DRIVEN[step.driver]}), which a Trainer training_step cannot express; "
                    "use advfunc's own training loop (advfunc train) or a loop of your own"
                )
            self._step, self._step_model = step, target
        assert self._step is not None
        return target, self._step

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch: the advfunc step, then Trainer's backward of the gradient surrogate."""
        target, step = self._current_step()
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.accelerator.autocast():
            grads, out = step(params_of(target), inputs)
        # fp16: Trainer's GradScaler sees the overflow in the surrogate and skips the update.
        # Otherwise non-finite grads would reach the weights silently: one host sync to refuse them.
        if not self.args.fp16 and not bool(all_finite(grads)):
            raise FloatingPointError(
                f"the {step.method} step produced non-finite gradients from finite inputs "
                f"(config {dict(step.config)}); lower its radii or step sizes"
            )
        accumulation = getattr(self, "current_gradient_accumulation_steps", None)
        accumulation = accumulation or self.args.gradient_accumulation_steps
        parameters = dict(target.named_parameters())
        # d/dθ Σ⟨θ, g⟩ = g: Trainer's backward (and its loss scaler) sees an ordinary loss.
        surrogate = torch.stack(
            [(parameters[name] * grad.detach().to(parameters[name].dtype)).sum() for name, grad in grads.items()]
        ).sum()
        self.accelerator.backward(surrogate / accumulation)
        return out.loss.detach().float() / accumulation
