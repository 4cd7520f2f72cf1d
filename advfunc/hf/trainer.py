"""Hugging Face ``Trainer`` integration: adversarial training with any advfunc step, on one or many processes.

``AdversarialTrainer`` replaces ``Trainer.training_step``; :func:`adversarial` gives the
same step to any ``Trainer`` subclass (TRL's ``SFTTrainer``: ``adversarial(SFTTrainer)``).
For each micro-batch it runs the pure step on the bare model and adds ``g / n_accum`` to
a gradient sum of its own; on the last micro-batch of an optimizer step it all-reduces that sum once (several processes)
and writes it to ``p.grad`` (``advfunc.set_grads``); with fp16 it goes through Trainer's
own backward instead, of a surrogate ``Σ ⟨θ, ḡ⟩`` whose gradient with respect to θ is
exactly ḡ, so that the ``GradScaler`` scales it like a loss. Everything Trainer does
around a backward therefore applies unchanged: the loss scaler, clipping, the optimizer,
the schedule, logging and checkpoints. The step runs under
``accelerator.autocast()``, so ``bf16=True`` / ``fp16=True`` give the same mixed
precision as Trainer's plain forward.

Several processes (``torchrun``, ``accelerate launch``: DDP): each optimizer step's
gradient is the mean over every process's micro-batches,

.. math::
    ḡ = \\frac1R \\sum_{r=1}^{R} \\frac1A \\sum_{a=1}^{A} g_{r,a}

by one bucketed all-reduce (:func:`advfunc.scale.distributed.all_reduce_grads`, one
collective per ``ddp_bucket_cap_mb`` bucket, 25 MiB by default) after the A
micro-batches, none inside an attack or between micro-batches. The grads are summed
here rather than through DDP's ``no_sync``: the step differentiates fresh leaves, not
DDP's parameters, and nothing runs DDP's forward, so DDP's reducer never fires; the sum
of the step's own grads is exact and costs no extra pass. A non-finite gradient
on one process makes the reduced sum non-finite on all, so every process refuses it (or,
with fp16, skips the update) together.

FSDP2 (``fsdp=True, fsdp_config={"version": 2}`` under accelerate, or a model the Trainer
is given already sharded with ``fully_shard``): each micro-batch's step runs inside
:func:`advfunc.scale.fsdp.unsharded` (every ``fully_shard`` module gathered once, so
FSDP's hooks leave the step's parameters in place), and after the all-reduce
:func:`advfunc.scale.fsdp.shard_grads` hands each rank its shard of ḡ, where the
optimizer built on the sharded parameters reads it. During the step each rank holds the
whole model, as under DDP; gradients and optimizer state stay sharded. DeepSpeed, FSDP
(v1), FSDP's own activation checkpointing, CPU offload and fp16 under FSDP2 are refused
before training (:func:`refuse_unsupported_sharding`).

Methods with state of their own run through one protocol (:mod:`advfunc.core.stateful`:
``init`` at the first step, ``update`` per micro-batch, ``after_update`` after each
optimizer step), so SMART's EMA teacher and free AT's carried δ live in their methods;
a method's ``replays`` > 1 makes each process's batch come back that many times in a
row (an epoch is then ``replays`` optimizer steps per batch). The state and the method's
random generator (method specs given as text) are saved in each Trainer checkpoint (one
file per process) and restored by ``trainer.train(resume_from_checkpoint=...)``.

On CUDA a step compiles by default (``compile=None``) and traces one graph per sequence
length (``torch.func.grad`` specialises it): batches padded each to its own longest
example compile new graphs for every new length until dynamo's recompile limit stops the
run. Give the Trainer a collator that pads to a multiple of 16, e.g.
``DataCollatorWithPadding(tokenizer, pad_to_multiple_of=16)``, which bounds the graphs by
the widths (``advfunc train`` does so on a GPU), or build the step with ``compile=False``.

Gradient accumulation and several processes weigh each micro-batch as Trainer weighs its
loss (:meth:`AdversarialTrainer.micro_batch_weight`): per labelled token for a causal LM
(``num_items_in_batch``), per micro-batch otherwise.

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
    trainer.train()          # torchrun --nproc_per_node 4 train.py: the same script, data parallel
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.utils.data import DataLoader, IterableDataset, Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from advfunc.attacks.synonyms import SynonymTable
from advfunc.core.completion import ADV_LABELS
from advfunc.core.params import params_of, set_grads
from advfunc.core.stateful import State, StatefulStep, stateful
from advfunc.core.step import Grads, Step, all_finite
from advfunc.core.targets import PERTURB_MASK, input_embedding
from advfunc.hf import atomic
from advfunc.hf.augmentation import A2TAugmenter
from advfunc.hf.replay import ReplaySampler
from advfunc.methods.registry import (
    METHODS,
    build_step,
    draws_noise,
    hyperparameters,
    needs_synonyms,
    parse_method,
    seeded_generator,
)
from advfunc.scale.distributed import DEFAULT_BUCKET_MB, all_reduce_grads
from advfunc.scale.fsdp import is_sharded, shard_grads, unsharded
from advfunc.words.augment import A2TConfig, AugmentationCost
from advfunc.words.synonym_attack import Encode
from advfunc.words.synonym_table import wordnet_table
from advfunc.words.wordnet import WordNet

METHOD_STATE = "advfunc_method"
GENERATOR = "generator"  # the method state's key for its noise generator's state
A2T_GENERATOR = "a2t_generator"  # the key for the state of the generator drawing A2T's attacked examples


class AdversarialTrainer(Trainer):
    """A ``Trainer`` whose training step is an advfunc method, on one process or several (DDP).

    ``step_factory(model) -> Step``, e.g. ``functools.partial(advfunc.fgm, epsilon=1.0)``
    or ``lambda m: advfunc.freelb(m, steps=2)``, or a method spec as the CLI takes it
    (``"pgd:epsilon=1.0,target=embeds"``, ``"smart:beta=0.999"``, ``"free_at:replays=4"``).
    It is called once, on the model that the step differentiates (the base model of a
    PEFT adapter model). A spec's method draws its noise from a generator seeded from
    ``args.seed`` (and the process index), saved in checkpoints; a factory of your own
    keeps its generator to itself.

    The step runs through the stateful protocol (:func:`advfunc.stateful`): its state
    (SMART's teacher, free AT's δ) starts from the parameters at the first step, moves
    after every optimizer step and is saved in checkpoints; a method that replays each
    batch (free AT) gets each batch ``step.replays`` times in a row, which needs
    ``gradient_accumulation_steps=1`` and a dataset with a length.

    ``augmentation``: A2T (:mod:`advfunc.hf.augmentation`): each batch, ``ratio`` of its
    examples (drawn from a generator seeded from ``args.seed`` and the process index, saved
    in checkpoints) is attacked by word substitution, and the gradient of α/B times the loss
    of the adversarial examples that flipped the prediction is added to the step's; the
    attack's similarity bound embeds texts with ``sentence_encoder`` and its candidates come
    from ``wordnet`` (None: read once). It needs ``processing_class=tokenizer``.
    :attr:`augmentation_cost` sums the attacks' cost, which the logged metrics carry as
    ``a2t_*``; the logged loss is the whole objective, adversarial term included.

    ``beta`` / ``replays``: with a spec, override the spec's SMART teacher decay / free
    AT's m (they are the factories' arguments). ``compile``: for a spec, ``False`` builds
    eager steps on CUDA too (None: the method's default, compiled on CUDA; compiling costs
    seconds to a minute per graph, which a short run may not win back).
    """

    def __init__(
        self,
        *args: Any,
        step_factory: Callable[[nn.Module], Step] | str,
        beta: float | None = None,
        replays: int | None = None,
        compile: bool | None = None,
        augmentation: A2TConfig | None = None,
        sentence_encoder: Encode | None = None,
        wordnet: WordNet | None = None,
        **kwargs: Any,
    ) -> None:
        self._generator: torch.Generator | None = None
        self._synonyms: SynonymTable | None = None
        overrides: dict[str, Any] = {k: v for k, v in (("beta", beta), ("replays", replays)) if v is not None}
        if isinstance(step_factory, str):
            spec = parse_method(step_factory)
            unknown = sorted(set(overrides) - set(hyperparameters(spec.name)))
            if unknown:
                raise ValueError(f"{unknown[0]}= has no meaning for method {spec.name!r}; leave it out")
            noisy = draws_noise(spec)

            def from_spec(model: nn.Module) -> Step:
                if noisy and self._generator is None:
                    # each process its own draws: shards of one global batch should not share their noise
                    self._generator = seeded_generator(model, self.args.seed + 100_003 * self.args.process_index)
                # Trainer turns checkpointing on when training starts, after the step is built: build it eager then.
                eager = compile if compile is not None else (False if self.args.gradient_checkpointing else None)
                if needs_synonyms(spec):
                    overrides["synonyms"] = self._synonym_table(model)
                return build_step(spec, model, generator=self._generator, compile=eager, **overrides)

            factory: Callable[[nn.Module], Step] = from_spec
        elif callable(step_factory):
            if overrides:
                name = next(iter(overrides))
                raise TypeError(
                    f"{name}= goes to the method's factory, e.g. step_factory=partial(advfunc.smart, beta=0.99) or "
                    f'partial(advfunc.free_at, replays=3), or in a spec ("smart:beta=0.99"), not to the Trainer'
                )
            factory = step_factory
        else:
            raise TypeError(f"step_factory must be callable as step_factory(model) -> Step, got {step_factory!r}")
        super().__init__(*args, **kwargs)
        refuse_unsupported_sharding(
            getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None,
            deepspeed=self.is_deepspeed_enabled,
            fp16=self.args.fp16,
            sharded_model=is_sharded(self.accelerator.unwrap_model(self.model)),
        )
        if getattr(self.args, "neftune_noise_alpha", None) is not None:
            raise ValueError(
                f"neftune_noise_alpha={self.args.neftune_noise_alpha} adds Trainer's noise to every forward of the "
                "advfunc step too, scaled by the padded or packed length; leave it unset and give "
                f'step_factory="neftune:alpha={self.args.neftune_noise_alpha}" (each sequence its own length)'
            )
        self.step_factory = factory
        self._step: StatefulStep | None = None
        self._step_model: nn.Module | None = None
        self._pending: Grads | None = None  # Σ g / n_accum over the micro-batches of this optimizer step
        self._state: State | None = None  # the method's state; None until the first step
        self._adversary_items: float | None = None  # M, the optimizer step's adversary tokens (get_batch_samples)
        step = self._current_step()[1]  # refuse a bad step now, not at the first batch
        if step.replays > 1 and self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"{step.method} replays each batch with an optimizer step in between; "
                f"use gradient_accumulation_steps=1, not {self.args.gradient_accumulation_steps}"
            )
        self.add_callback(_AfterOptimizerStep(self))
        self._augmenter = self._a2t(augmentation, sentence_encoder, wordnet)

    def _a2t(
        self, augmentation: A2TConfig | None, sentence_encoder: Encode | None, wordnet: WordNet | None
    ) -> A2TAugmenter | None:
        """A2T's per-batch examples for ``augmentation`` (its generator seeded per process), or None."""
        if augmentation is None and (sentence_encoder is not None or wordnet is not None):
            raise ValueError("sentence_encoder= and wordnet= serve A2T's attack: give augmentation=A2TConfig(...) too")
        if augmentation is None:
            return None
        if not isinstance(augmentation, A2TConfig):
            raise TypeError(
                f"augmentation must be an advfunc.words.augment.A2TConfig, got {type(augmentation).__name__}"
            )
        seed = self.args.seed + 100_003 * self.args.process_index
        return A2TAugmenter(augmentation, self.processing_class, seed=seed, encode=sentence_encoder, wordnet=wordnet)

    @property
    def augmentation_cost(self) -> AugmentationCost | None:
        """What A2T's attacks cost in this process so far (None without ``augmentation``)."""
        return None if self._augmenter is None else self._augmenter.cost

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._augmenter is not None and "loss" in logs:  # training logs, not evaluation's
            logs = {**logs, **{f"a2t_{k}": v for k, v in self._augmenter.cost.as_dict().items()}}
        super().log(logs, *args, **kwargs)

    def _synonym_table(self, model: nn.Module) -> SynonymTable:
        """WordNet's synonyms of the tokenizer's vocabulary (ASCC, DNE given by name), built once."""
        if self._synonyms is None:
            if self.processing_class is None:
                raise ValueError(
                    "a method that substitutes synonyms needs the tokenizer to build its synonym table: pass "
                    "processing_class=tokenizer, or step_factory=partial(advfunc.ascc, synonyms=table) with a table "
                    "from advfunc.words.synonym_table"
                )
            rows = int(getattr(input_embedding(model), "num_embeddings", 1))  # the factory refuses a non-lookup one
            self._synonyms = wordnet_table(self.processing_class, vocab_size=rows)
        return self._synonyms

    @property
    def step(self) -> StatefulStep:
        """The method's step on the model being trained: its ``passes`` per batch, ``replays``, ``config``."""
        return self._current_step()[1]

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

    def _current_step(self) -> tuple[nn.Module, StatefulStep]:
        target = self.adversarial_model()
        if self._step is None or self._step_model is not target:
            with self._whole_parameters():  # a step is refused on sharded parameters
                step = self.step_factory(target)
            if not isinstance(step, Step):
                raise TypeError(f"step_factory returned {type(step).__name__}, not an advfunc Step")
            self._step, self._step_model = stateful(step), target
        assert self._step is not None
        return target, self._step

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch: the advfunc step; on an optimizer step's last one, the all-reduce and the backward."""
        target, step = self._current_step()
        model.train()
        inputs = self._prepare_inputs(inputs)
        weight = self.micro_batch_weight(inputs, num_items_in_batch)
        away = self.away_scale(step, inputs, num_items_in_batch)
        keywords = {} if away is None else {"away_scale": away}
        with self._whole_parameters():
            params = params_of(target)
            if self._state is None:
                self._state = step.init(params)
            augmented = None if self._augmenter is None else self._augmenter.grads(target, params, inputs)
            with self.accelerator.autocast():
                grads, out, self._state = step.update(params, inputs, self._state, **keywords)
        loss = out.loss.detach().float()
        if augmented is not None:
            for name, grad in augmented[0].items():
                grads[name] = grads[name] + grad
            loss = loss + augmented[1].float()
        if self._pending is None:
            self._pending = {n: g.mul_(weight) if weight != 1 else g for n, g in grads.items()}
        else:
            for name, grad in grads.items():
                self._pending[name].add_(grad, alpha=weight)
        if self.accelerator.sync_gradients:
            total, self._pending = self._pending, None
            self._backward(step, target, total)
        return loss * weight

    def micro_batch_weight(self, inputs: Mapping[str, Any], num_items_in_batch: torch.Tensor | int | None) -> float:
        """The factor of this micro-batch's grads in the optimizer step's gradient, as Trainer weighs its loss.

        Without ``num_items_in_batch`` (a model whose loss takes no such argument, e.g.
        sequence classification: one item per example) each of the A micro-batches of
        an optimizer step counts ``1/A``. With it (a causal LM: Trainer counts the
        labelled tokens of every micro-batch of the optimizer step, on every process with
        ``average_tokens_across_devices``), the micro-batch's loss, a mean over its own
        n_a labelled tokens, counts ``n_a / N``, times R processes when N counts all of
        them (the all-reduce then averages over R):

        .. math::
            ḡ = \\frac1R \\sum_r \\sum_a \\frac{R · n_{r,a}}{N} g_{r,a}
              = \\frac1N \\sum_{r,a} \\sum_{t \\in r,a} ∇ℓ_t

        the gradient of one batch holding every example, per token. Every term of the
        step's objective that is a mean over the labelled tokens (VAT/SMART/R3F's KL over
        the completion positions, CAT/LAT's toward and utility/retain losses) is weighted
        by that same share n_a / N; CAT's and LAT's away term, a mean over the adversary's
        tokens, by its share of those (:meth:`away_scale`).
        """
        accumulation = getattr(self, "current_gradient_accumulation_steps", None)
        accumulation = accumulation or self.args.gradient_accumulation_steps
        if num_items_in_batch is None or "labels" not in inputs:
            return 1.0 / accumulation
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs["labels"][..., 1:] if getattr(self, "_loss_shifts_labels", False) else inputs["labels"]
        processes = self.args.world_size if self.args.average_tokens_across_devices else 1
        return float(labels.ne(-100).sum()) * processes / float(num_items_in_batch)

    def away_scale(
        self, step: Step, inputs: Mapping[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> float | None:
        """CAT's and LAT's away term's factor, relative to :meth:`micro_batch_weight`; None: no factor.

        The away term is a mean over the m_a tokens of the adversary's completion
        (``adv_labels``), not over the n_a labelled ones. With ``num_items_in_batch``, the
        optimizer step's M adversary tokens are counted with it (:meth:`get_batch_samples`,
        over every process when N is), and the away term counts m_a / M where the rest of
        the objective counts n_a / N: the factor is (m_a / M) / (n_a / N), and the
        accumulated step equals one batch of every example for the away term too. None
        (the labelled tokens' share for the away term as well) for a method without
        ``adv_labels``, without ``num_items_in_batch``, or when no M was counted (a
        ``training_step`` called outside Trainer's loop).
        """
        method = METHODS.get(step.method)
        if method is None or ADV_LABELS not in method.batch_keys or ADV_LABELS not in inputs:
            return None
        if num_items_in_batch is None or self._adversary_items is None:
            return None
        weight = self.micro_batch_weight(inputs, num_items_in_batch)
        if weight == 0:
            return None  # CAT and LAT refuse a batch with nothing labelled
        processes = self.args.world_size if self.args.average_tokens_across_devices else 1
        share = float(_adversary_tokens(inputs)) * processes / float(self._adversary_items)
        return share / weight

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | int | None]:
        """Trainer's micro-batches of one optimizer step and their labelled-token count N.

        Also counts the adversary's completion tokens M of the step (``adv_labels``, for
        :meth:`away_scale`), over every process when Trainer counts N over them.
        """
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._adversary_items = None
        if num_items is not None and batch_samples and all(ADV_LABELS in b for b in batch_samples):
            count = torch.stack([_adversary_tokens(b) for b in batch_samples]).sum()
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count.to(device)).sum()
            self._adversary_items = float(count)
        return batch_samples, num_items

    def _backward(self, step: Step, target: nn.Module, grads: Grads) -> None:
        """All-reduce the optimizer step's gradient once, then hand it to ``p.grad`` (fp16: through the scaler)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # DDP's own bucket size, when TrainingArguments sets one (ddp_bucket_cap_mb)
            grads = all_reduce_grads(grads, bucket_mb=self.args.ddp_bucket_cap_mb or DEFAULT_BUCKET_MB)
        if self.accelerator.scaler is not None:
            # fp16's GradScaler scales the surrogate like a loss, and an overflow in it skips the update.
            parameters = dict(target.named_parameters())
            # d/dθ Σ⟨θ, g⟩ = g: Trainer's backward sees an ordinary loss.
            surrogate = torch.stack(
                [(parameters[n] * g.detach().to(parameters[n].dtype)).sum() for n, g in grads.items()]
            ).sum()
            self.accelerator.backward(surrogate)
            return
        # Non-finite grads would otherwise reach the weights silently: one host sync to refuse them.
        if not bool(all_finite(grads)):
            raise FloatingPointError(
                f"the {step.method} step produced non-finite gradients from finite inputs "
                f"(config {dict(step.config)}); lower its radii or step sizes"
            )
        # Without a scaler the gradient goes to p.grad as it is: the surrogate's backward would
        # cost one more sweep over every parameter (13% of a MiniLM step on CPU).
        if is_sharded(self.accelerator.unwrap_model(self.model)):
            shard_grads(target, grads)  # the same on every rank: each keeps its own shard
        else:
            set_grads(target, grads, accumulate=True)

    def get_train_dataloader(self) -> DataLoader[Any]:
        # Trainer keeps only the keys the model's forward takes (remove_unused_columns); the
        # keys advfunc consumes itself must reach the step, or a perturb_mask would vanish
        # silently. Evaluation calls the model directly, so there they are still removed.
        step = self._current_step()[1]
        if step.replays > 1 and isinstance(self.train_dataset, IterableDataset):
            # Trainer gives an iterable dataset no sampler, so the replaying sampler never runs:
            # batch k's δ would carry over to batch k+1 with no replay at all.
            raise ValueError(
                f"{step.method} replays each batch, which needs a training dataset with a length; "
                f"got an iterable {type(self.train_dataset).__name__}: materialise it (e.g. Dataset.from_list) "
                "or use a method that does not replay"
            )
        self._set_signature_columns_if_needed()
        model_columns: list[str] = list(self._signature_columns or [])
        method = METHODS.get(self._current_step()[1].method)
        consumed = (PERTURB_MASK, *(() if method is None else method.batch_keys))
        # Trainer's __init__ sets the attribute to None (mypy's type for it) and fills it lazily.
        self._signature_columns = model_columns + [k for k in consumed if k not in model_columns]  # type: ignore[assignment]
        try:
            return super().get_train_dataloader()
        finally:
            self._signature_columns = model_columns  # type: ignore[assignment]

    def after_optimizer_step(self) -> None:
        """The method's state after the optimizer moved the parameters (SMART's EMA teacher, free AT's replays)."""
        if self._state is not None:
            target, step = self._current_step()
            with self._whole_parameters():
                self._state = step.after_update(self._state, params_of(target))

    def _whole_parameters(self) -> contextlib.AbstractContextManager[Any]:
        """FSDP2: every ``fully_shard`` module gathered for the step (:func:`advfunc.scale.fsdp.unsharded`)."""
        model = self.accelerator.unwrap_model(self.model)
        return unsharded(model) if is_sharded(model) else contextlib.nullcontext()

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int] | None:
        sampler = super()._get_train_sampler(train_dataset)
        step = self._current_step()[1]
        if step.replays == 1:
            return sampler
        if sampler is None or self.args.train_sampling_strategy == "batch_rebalance":
            raise ValueError(
                f"{step.method} replays each batch: it needs a training dataset with a length, sampled per "
                f"example (train_sampling_strategy {self.args.train_sampling_strategy!r})"
            )
        return ReplaySampler(
            sampler,
            self._train_batch_size,
            self.args.world_size,
            step.replays,
            drop_last=self.args.dataloader_drop_last,
        )

    def method_state(self) -> dict[str, Any]:
        """The method's own training state on this process (teacher, carried δ) and its generator's state."""
        state: dict[str, Any] = dict(self._state or {})
        if self._generator is not None:
            state[GENERATOR] = self._generator.get_state()
        if self._augmenter is not None:
            state[A2T_GENERATOR] = self._augmenter.generator.get_state()
        return state

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""
        device = next(self.adversarial_model().parameters()).device
        saved = {k: _to_device(v, device) for k, v in state.items() if k not in (GENERATOR, A2T_GENERATOR)}
        self._state = saved if saved or self._current_step()[1].carries_state else None
        if GENERATOR in state:
            if self._generator is None:
                raise ValueError("the checkpoint holds a method generator's state, but this method draws no noise")
            self._generator.set_state(state[GENERATOR])
        if A2T_GENERATOR in state:
            if self._augmenter is None:
                raise ValueError("the checkpoint holds A2T's generator state, but this Trainer has no augmentation")
            self._augmenter.generator.set_state(state[A2T_GENERATOR])

    def _method_file(self, folder: str | os.PathLike[str]) -> Path:
        suffix = f"_{self.args.process_index}" if self.args.world_size > 1 else ""
        return Path(folder) / f"{METHOD_STATE}{suffix}.pt"

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        state = self.method_state()
        if state and not self.args.save_only_model:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            atomic.write_with(self._method_file(folder), lambda temporary: torch.save(state, temporary))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._current_step()  # the generator exists before its state is set
        path = self._method_file(resume_from_checkpoint)
        if path.is_file():
            self.load_method_state(torch.load(path, map_location="cpu", weights_only=True))
        elif self.method_state() or self._current_step()[1].carries_state:
            raise ValueError(
                f"{resume_from_checkpoint} has no {path.name}, the {self._current_step()[1].method} method's "
                "teacher, replay perturbation or generator state; resuming without it would not continue the run"
            )


def refuse_unsupported_sharding(fsdp_plugin: Any, *, deepspeed: bool, fp16: bool, sharded_model: bool) -> None:
    """Raise ``ValueError``, naming the reason and what to use instead, for sharding the step cannot train under.

    ``fsdp_plugin``: accelerate's ``FullyShardedDataParallelPlugin`` when the Trainer runs
    FSDP, else None; ``sharded_model``: the model already holds ``fully_shard`` modules.
    FSDP2 trains (the step runs on the gathered parameters, :func:`advfunc.scale.fsdp.unsharded`);
    DeepSpeed, FSDP (v1), FSDP's own activation checkpointing, CPU offload and fp16 under
    FSDP2 are refused.
    """
    if deepspeed:
        raise ValueError(
            "AdversarialTrainer does not run under DeepSpeed: ZeRO-3 shards the parameters that advfunc's "
            "functional step substitutes (its gradients would be zero) and DeepSpeed reduces gradients in "
            "its own backward; use FSDP2 (fsdp=True, fsdp_config={'version': 2}) or DDP (torchrun, accelerate launch)"
        )
    if fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "AdversarialTrainer runs under FSDP2 only: FSDP (v1) flattens the parameters that advfunc's "
            "functional step substitutes, so its gradients would be zero; set fsdp_config={'version': 2}"
        )
    if fsdp_plugin is not None and fsdp_plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_config activation_checkpointing wraps the layers in torch's checkpoint wrapper, whose "
            "recompute reads the layers' own parameters, not the step's; leave it off and set "
            "gradient_checkpointing=True (transformers' checkpointing, which advfunc's step supports)"
        )
    if fsdp_plugin is not None and isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError(
            "FSDP2 with cpu_offload keeps the sharded parameters and their gradients on the CPU, while "
            "advfunc's step hands back gradients on the GPU; leave cpu_offload off (or use DDP with LoRA)"
        )
    if fp16 and (fsdp_plugin is not None or sharded_model):
        raise ValueError(
            "fp16 under FSDP2 needs a sharded gradient scaler, which advfunc's step does not drive; "
            "use bf16=True (or fp16 under DDP)"
        )


def _adversary_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """The tokens of the adversary's completion its away loss averages over (those after the first position)."""
    adv_labels: torch.Tensor = batch[ADV_LABELS]
    return adv_labels[..., 1:].ne(-100).sum()


def _to_device(value: Any, device: torch.device) -> Any:
    """A saved state's tensors (in dicts, at any depth) on ``device``; numbers and None as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class _AfterOptimizerStep(TrainerCallback):
    """Calls the trainer's method update after each optimizer step."""

    def __init__(self, trainer: AdversarialTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.after_optimizer_step()


_ADVERSARIAL: dict[type[Trainer], type[AdversarialTrainer]] = {}


def adversarial(trainer_class: type[Trainer]) -> type[AdversarialTrainer]:
    """``trainer_class`` with advfunc's training step: a subclass that also takes ``step_factory``.

    ``adversarial(SFTTrainer)(model=..., args=SFTConfig(...), train_dataset=...,
    step_factory="pgd:target=embeds")`` keeps everything the class does around the step
    (TRL's chat templates, packing, completion-only labels, its PEFT wrapping) and
    replaces the micro-batch's forward+backward with the advfunc step, as
    :class:`AdversarialTrainer` does for ``Trainer``. The class's own ``compute_loss`` is
    not called in training (its training metrics are not logged). One class per
    ``trainer_class`` (the same object on every call).
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(
            f"adversarial takes a transformers.Trainer subclass, e.g. trl.SFTTrainer; got {trainer_class!r}"
        )
    if issubclass(trainer_class, AdversarialTrainer):
        return trainer_class
    if trainer_class is Trainer:
        return AdversarialTrainer
    if trainer_class not in _ADVERSARIAL:
        name = f"Adversarial{trainer_class.__name__}"
        doc = f"``{trainer_class.__name__}`` whose training step is an advfunc method (:func:`advfunc.hf.adversarial`)."
        _ADVERSARIAL[trainer_class] = type(name, (AdversarialTrainer, trainer_class), {"__doc__": doc})
    return _ADVERSARIAL[trainer_class]
