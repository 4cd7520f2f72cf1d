"""ASCC training: the clean loss plus β · KL to the worst sparse convex combination of synonyms (Dong et al., 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.attacks.synonyms import SynonymTable
from advfunc.core.arguments import require_positive
from advfunc.core.divergence import kl_logits
from advfunc.core.model import LossFn, logits_of
from advfunc.core.objective import Leaves
from advfunc.core.step import Grads, Step, StepOutput, check_hook_fired, prepare


def ascc(
    model: nn.Module,
    synonyms: SynonymTable,
    steps: int = 5,
    lr: float = 1.0,
    sparsity: float = 10.0,
    beta: float = 4.0,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """ASCC: train on the task loss plus β · KL between the clean and the adversarial combination's predictions.

    .. math::
        δ = \\text{ascc}(θ, x),\\quad
        \\text{grads} = ∇_θ\\big[L(θ, 0) + β · \\mathrm{KL}\\big(p(·|x;θ) ‖ p(·|x + δ;θ)\\big)\\big]

    δ is :func:`advfunc.attacks.ascc` (``objective="kl"``): each token's embedding replaced
    by the convex combination of its own and its synonyms' embeddings (``synonyms``, an
    :class:`advfunc.attacks.SynonymTable`) that ``steps`` Adam steps of rate ``lr`` find
    to maximise the KL, with the entropy penalty ``sparsity`` driving the weights to a
    vertex. The KL is the batch mean and is differentiated through both forwards, as
    in the reference implementation (TextDefender: β = 4, sparsity 10, 5 steps). δ is
    held fixed in the parameter gradient, as for every embedding-output perturbation:
    the embedding matrix's gradient reaches the token's own row, where the paper's forward
    of Σ w e(n) spreads it over the neighbours' rows by w.

    ``out``: ``loss`` the task loss, ``adv_loss`` the KL (before β), ``delta`` δ [B, L, H].

    Cost: ``steps`` passes that differentiate δ only, then 2 forwards and one backward
    through both: steps + 2 passes. ``compile`` compiles the δ-only passes; the final
    objective spans two forwards and stays eager. Paper: Dong, Luu, Ji & Liu, "Towards
    Robustness Against Natural Language Word Substitutions", ICLR 2021.

    Example::

        table = advfunc.words.synonym_table.wordnet_table(tokenizer)
        ascc_step = advfunc.ascc(model, table, steps=5, beta=4.0)
        grads, out = ascc_step(advfunc.params_of(model), batch)
    """
    beta = require_positive("beta", beta)
    attack = attacks.ascc(
        model, synonyms, steps, lr, sparsity, "kl", loss_fn=loss_fn, autocast=autocast, compile=compile
    )
    engine, target, perturbed = attack.engine, attack.target, attack.perturbed

    def step(
        params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, target, params, batch, loss_scale)
        with perturbed.hooked() as calls:
            leaves = Leaves(engine, call)
            task_loss, clean_outputs = perturbed.loss(leaves.params, call.kwargs, leaves.probe())
            clean = logits_of(clean_outputs)  # [B, C]
            delta, skipped = attack.run(call, reference=clean.detach())
            adversarial = engine.outputs(leaves.params, call.kwargs, call.layout, delta, leaves.probe())
            check_hook_fired(calls, target)
            divergence = kl_logits(clean, logits_of(adversarial), perturbed.counted_positions(call.kwargs, clean))
            grads = leaves.gradient((task_loss + beta * divergence) * call.scale)
        out = StepOutput(
            loss=task_loss.detach(),
            adv_loss=divergence.detach(),
            delta=delta["embeds"].detach(),
            skipped=skipped,
            logits=clean.detach(),
        )
        return grads, out

    config = {**attack.config, "beta": beta, "forward_only_passes": 0}
    return Step("ascc", steps + 2, config, step)
