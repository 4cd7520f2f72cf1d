"""CAT's attack: sign-gradient descent on the adversary's completion loss at the prompt (Xhonneux et al., 2024)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule, zero_init
from advfunc.core.arguments import require_norm, require_positive, require_steps
from advfunc.core.completion import ADV_LABELS, adversary_kwargs
from advfunc.core.model import LossFn
from advfunc.core.norms import l2_direction
from advfunc.core.params import Params
from advfunc.core.projection import project_l2, project_linf
from advfunc.core.step import Call, prepare
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, Target, input_embedding

Direction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sign_direction(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign(g) in float32, 0 where g is not finite; whether all of g is finite)."""
    finite = torch.isfinite(g)
    return torch.where(finite, torch.sign(g.float()), torch.zeros((), device=g.device)), finite.all()


def token_l2_direction(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g / ‖g‖₂ per token over the hidden axis, in float32; whether all of g is finite)."""
    return l2_direction(g, -1)


def descent_rule(target: Target, epsilon: float, alpha: float, steps: int, norm: str, direction: Direction) -> Rule:
    """δ₀ = 0, δ_t = Π_ε(δ_{t-1} − α · direction(∇_δ L_adv)), Π_ε per token over the hidden axis.

    The adversary lowers its completion's loss, so the step descends. A token the target
    masks has a zero gradient and stays at 0.
    """

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        moved: Delta = {}
        finite_all = torch.ones((), dtype=torch.bool, device=next(iter(delta.values())).device)
        for key, value in delta.items():
            step, finite = direction(grads[key])
            finite_all = finite_all & finite
            stepped = (value.float() - alpha * step).to(value.dtype)
            moved[key] = project_l2(stepped, epsilon, -1) if norm == "l2" else project_linf(stepped, epsilon)
        return moved, finite_all

    # The caller's grads are of the desired completion's loss, not the adversary's: never read.
    return Rule(zero_init(target), ascend, steps, reads_grads=False)


class CompletionAttack(Attack):
    """An attack whose objective is the loss of the adversary's completion (``batch["adv_labels"]``).

    ``attack(params, batch)`` consumes ``adv_labels`` and never passes it to the model;
    the perturbation is placed on the prompt of the batch's own sequence, which the
    adversary's sequence shares (:func:`~advfunc.core.completion.adversary_kwargs`).
    """

    def calls(
        self, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], loss_scale: float | torch.Tensor
    ) -> tuple[Call, Call]:
        """(the batch's call, the adversary's): one layout, the prompt's; kwargs of each sequence."""
        if not isinstance(batch, Mapping) or batch.get(ADV_LABELS) is None:
            raise ValueError(
                f"{self.name} needs the adversary's completion in the batch: batch[{ADV_LABELS!r}] [batch, seq], "
                "its tokens at their positions after the prompt and −100 elsewhere"
            )
        rest = {k: v for k, v in batch.items() if k != ADV_LABELS}
        call = prepare(self.model, self.perturbed, self.target, params, rest, loss_scale)
        adversary = dataclasses.replace(call, kwargs=adversary_kwargs(call.kwargs, batch[ADV_LABELS]))
        return call, adversary

    def prepare(
        self, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], loss_scale: float | torch.Tensor
    ) -> Call:
        return self.calls(params, batch, loss_scale)[1]


def cat(
    model: nn.Module,
    epsilon: float = 0.05,
    alpha: float = 0.01,
    steps: int = 10,
    norm: str = "l2",
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> CompletionAttack:
    """CAT's embedding attack on the prompt: ``delta = attack(params, batch)`` [B, L, H].

    .. math::
        δ_0 = 0,\\quad
        δ_t = Π_ε\\big(δ_{t-1} − α · \\operatorname{sign} ∇_δ L(θ, δ_{t-1};\\, x, \\tilde y)\\big),\\quad
        δ = δ_K

    L(θ, δ; x, ỹ) is the loss of the adversary's completion ỹ (``batch["adv_labels"]``)
    after the prompt x with δ added to the prompt's input embeddings; δ is zero at the
    completion and at padding. Π_ε is per token over the hidden axis: the L2 ball
    (``norm="l2"``, the authors') or the L∞ box (``norm="linf"``). The authors set ε
    relative to the mean norm of the embedding rows; here ε is absolute. The batch needs
    ``labels`` with −100 at the prompt. ``grads`` is accepted for the protocol and never
    read (it would be the desired completion's gradient).

    Cost: K passes that differentiate δ only. Paper: Xhonneux et al., "Efficient
    Adversarial Training in LLMs with Continuous Attacks", NeurIPS 2024.

    Example::

        attack = advfunc.attacks.cat(model, epsilon=0.05, alpha=0.01, steps=10)
        delta = attack(params, {**batch, "adv_labels": adversary_completion})   # [B, L, H]
    """
    epsilon = require_positive("epsilon", epsilon)
    alpha = require_positive("alpha", alpha)
    steps = require_steps("steps", steps)
    norm = require_norm(norm)
    chosen = EmbeddingOutput(input_embedding(model), prompt=True)
    config = {"epsilon": epsilon, "alpha": alpha, "steps": steps, "norm": norm, "target": "embeds@prompt"}
    rule = descent_rule(chosen, epsilon, alpha, steps, norm, sign_direction)
    return CompletionAttack("cat", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, compile=compile)
