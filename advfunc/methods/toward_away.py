"""The defender's step of CAT and targeted LAT: toward the desired completion, away from the adversary's.

.. math::
    \\text{grads} = ∇_θ\\big[w_t · L(θ, δ; x, y) + w_a · L_{away}(θ, δ; x, \\tilde y) + w_c · C(θ)\\big],
    \\quad δ = \\text{attack}(θ, \\text{batch})

y is the desired completion (``labels``), ỹ the adversary's (``adv_labels``), δ the
attack's perturbation of the prompt (held fixed), L_away the unlikelihood loss
−log(1 − p) (:func:`~advfunc.core.completion.away_loss`) and C the clean term: the
loss of y without δ, or KL(p_θ ‖ p_ref) over y's positions when reference parameters
are given. The three forwards share one backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from advfunc.attacks.cat import CompletionAttack
from advfunc.core.arguments import require_non_negative
from advfunc.core.completion import away_loss
from advfunc.core.divergence import kl_logits
from advfunc.core.engine import owned
from advfunc.core.model import logits_of
from advfunc.core.objective import fresh_leaves
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired
from advfunc.methods.smart import teacher_params


def weights(toward: float, away: float, clean: float, clean_name: str) -> tuple[float, float, float]:
    """The three loss weights, each finite and >= 0, not all 0."""
    checked = (
        require_non_negative("toward", toward),
        require_non_negative("away", away),
        require_non_negative(clean_name, clean),
    )
    if not any(checked):
        raise ValueError(f"toward, away and {clean_name} are all 0: the step would train on nothing")
    return checked


def toward_away_step(
    method: str, attack: CompletionAttack, toward: float, away: float, clean: float, steps: int
) -> Step:
    """The step ``grads, out = step(params, batch, reference=None)`` for ``attack`` (module docstring).

    Cost: the attack's K = ``steps`` passes, then one forward and backward for the toward
    term and for each of the away and clean terms whose weight is not 0 (a clean term of
    weight 0 is still computed for ``out.loss``, forward only); a reference adds one
    forward without backward.

    ``out``: ``loss`` the clean loss of y, ``adv_loss`` L(θ, δ; x, y), ``delta`` δ in the
    attack's public form, ``logits`` the clean logits.

    ``away_scale`` multiplies the away term alone, on top of ``loss_scale``. L and C are
    means over the n labelled tokens of y, L_away over the m tokens of ỹ: a loop that
    weighs each micro-batch's grads by its share n/N of the optimizer step's labelled
    tokens passes ``away_scale = (m/M) / (n/N)``, so that the away term counts by its share
    of the step's M adversary tokens and the accumulated step equals one batch of them all
    (:meth:`advfunc.hf.AdversarialTrainer.away_scale` does).
    """
    engine, target, perturbed = attack.engine, attack.target, attack.perturbed

    def step(
        params: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        reference: Mapping[str, torch.Tensor] | None = None,
        *,
        loss_scale: float | torch.Tensor = 1.0,
        away_scale: float = 1.0,
    ) -> tuple[Grads, StepOutput]:
        call, adversary = attack.calls(params, batch, loss_scale)
        anchor = None if reference is None else teacher_params(reference, call.params, 1.0)
        with perturbed.hooked(count=not attack.compiled) as calls:
            delta, skipped = attack.run(adversary)
            check_hook_fired(calls, target)
            # The adversary's sequence has other tokens than the batch's, so the embedding
            # matrix is an ordinary leaf here (no gradient by the batch's rows).
            leaves = fresh_leaves(call.params, call.trainable)
            theta = {**call.params, **leaves}
            toward_loss, _ = engine.loss(theta, call.kwargs, call.layout, delta)
            objective = toward * toward_loss
            if away > 0:
                pushed = logits_of(engine.outputs(theta, adversary.kwargs, call.layout, delta))
                objective = objective + away * away_scale * away_loss(pushed, adversary.kwargs["labels"])
            with torch.set_grad_enabled(clean > 0):
                clean_loss, clean_outputs = perturbed.loss(theta, call.kwargs, None)
                clean_logits = logits_of(clean_outputs)
                if anchor is None:
                    clean_term = clean_loss
                else:
                    with torch.no_grad():
                        anchored = logits_of(perturbed.outputs(anchor, call.kwargs, None))
                    positions = perturbed.counted_positions(call.kwargs, clean_logits)
                    clean_term = kl_logits(clean_logits, anchored, positions)
            if clean > 0:
                objective = objective + clean * clean_term
            found = torch.autograd.grad(
                objective * call.scale, list(leaves.values()), allow_unused=True, materialize_grads=True
            )
        grads = owned(dict(zip(leaves, found, strict=True)))
        out = StepOutput(
            loss=clean_loss.detach(),
            adv_loss=toward_loss.detach(),
            delta=target.public({k: v.detach() for k, v in delta.items()}),
            skipped=skipped,
            logits=clean_logits.detach(),
        )
        return grads, out

    passes = steps + 1 + (away > 0) + (clean > 0)
    forward_only = 1 if clean == 0 else 0
    return Step(method, passes, {**attack.config, "forward_only_passes": forward_only}, step)
