"""ASCC training: the clean loss plus β · KL to the worst sparse convex combination of synonyms (Dong et al., 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.attacks.ascc import masked_softmax
from advfunc.attacks.synonyms import SynonymEmbeddings, SynonymTable, add_hull_rows, neighbours_of
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
    in the reference implementation (TextDefender: β = 4, sparsity 10, 5 steps), and
    through the paper's forward Σ_j w_j e(n_j) with w held fixed: the embedding matrix's
    gradient reaches every neighbour's row, weighted by w (:func:`add_hull_rows`).

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
    assert isinstance(target, SynonymEmbeddings)  # the synonym attacks' own target: W by name
    weight = target.weight_name

    def step(
        params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, target, params, batch, loss_scale)
        with perturbed.hooked() as calls:
            leaves = Leaves(engine, call)
            task_loss, clean_outputs = perturbed.loss(leaves.params, call.kwargs, leaves.probe())
            clean = logits_of(clean_outputs)  # [B, C]
            last, skipped = attack.run(call, reference=clean.detach())
            delta = last["embeds"].detach().requires_grad_(True)
            adversarial = engine.outputs(leaves.params, call.kwargs, call.layout, {"embeds": delta}, leaves.probe())
            check_hook_fired(calls, target)
            divergence = kl_logits(clean, logits_of(adversarial), perturbed.counted_positions(call.kwargs, clean))
            grads, (at_delta,) = leaves.gradients((task_loss + beta * divergence) * call.scale, delta)
        if weight in grads:  # the paper's forward Σ_j w_j e(n_j): every neighbour's row
            weights = masked_softmax(last["logits"], neighbours_of(call.layout).valid)
            add_hull_rows(grads[weight], weights, at_delta, call.layout, skipped)
        out = StepOutput(
            loss=task_loss.detach(),
            adv_loss=divergence.detach(),
            delta=delta.detach(),
            skipped=skipped,
            logits=clean.detach(),
        )
        return grads, out

    config = {**attack.config, "beta": beta, "forward_only_passes": 0}
    return Step("ascc", steps + 2, config, step)
