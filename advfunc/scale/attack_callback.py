"""A Hugging Face ``Trainer`` callback that follows robustness while a model trains.

:class:`AttackSuccessCallback` runs the adaptive embedding attack
(:func:`advfunc.attacks.success_rate`) at every evaluation and reports its success rate
at each radius and step budget beside the evaluation loss, so a defence's robustness is
followed during training with the attack it must withstand::

    trainer = AdversarialTrainer(..., callbacks=[AttackSuccessCallback(batch, radii=(0.05, 0.1, 0.2))])
    metrics = trainer.evaluate()      # {"eval_loss": ..., "eval_asr_r0.05_k10": ..., ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from advfunc.attacks.adaptive import SuccessRate, success_rate
from advfunc.core.arguments import require_norm, require_positive, require_steps
from advfunc.core.params import params_of


class AttackSuccessCallback(TrainerCallback):
    """At each evaluation, the adaptive attack's success rate per radius and step budget.

    ``batches``: one batch or several, each with the prompts, ``labels`` (−100 at the
    prompt) and the target completion under ``adv_labels`` (see
    :func:`advfunc.attacks.adaptive`). The attack runs on the model as the evaluation
    leaves it (in eval mode), draws its restarts from a generator seeded with ``seed`` at
    every evaluation (evaluations compare like with like), and adds
    ``{prefix}_r{radius}_k{steps}`` to the evaluation's metrics (what
    ``trainer.evaluate()`` returns and ``metric_for_best_model`` may name) and to the
    state's log history. ``last`` holds the latest table.

    Cost per evaluation: per radius and batch, at most ``restarts``·(max(steps) + 1)
    passes that differentiate the perturbation only.
    """

    def __init__(
        self,
        batches: Mapping[str, Any] | Iterable[Mapping[str, Any]],
        radii: Sequence[float],
        steps: int | Sequence[int] = (10, 50),
        restarts: int = 4,
        norm: str = "linf",
        seed: int = 0,
        prefix: str = "eval_asr",
    ) -> None:
        self.batches = [batches] if isinstance(batches, Mapping) else list(batches)
        if not self.batches:
            raise ValueError("batches is empty: give the batch (or batches) to attack at each evaluation")
        if not radii:
            raise ValueError("radii is empty; give the perturbation radii to evaluate, e.g. radii=(0.05, 0.1)")
        self.radii = [require_positive("radius", r) for r in radii]
        self.steps = [require_steps("steps", k) for k in ([steps] if isinstance(steps, int) else steps)]
        if not self.steps:
            raise ValueError("steps is empty; give one step budget or several, e.g. steps=(10, 50)")
        self.restarts = require_steps("restarts", restarts)
        self.norm = require_norm(norm)
        self.seed = seed
        self.prefix = prefix
        self.last: list[SuccessRate] = []

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("AttackSuccessCallback needs the model; the Trainer passes it to every callback")
        device = next(model.parameters()).device
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in self.batches]
        self.last = success_rate(
            model,
            params_of(model),
            batches,
            self.radii,
            self.steps,
            self.restarts,
            self.norm,
            torch.Generator(device=device).manual_seed(self.seed),
        )
        found = {f"{self.prefix}_r{row.radius:g}_k{row.steps}": row.rate for row in self.last}
        if metrics is not None:
            metrics.update(found)
        state.log_history.append({**found, "step": state.global_step})
