"""CAT training: toward, away and utility losses under a continuous prompt-embedding attack (Xhonneux et al., 2024)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.model import LossFn
from advfunc.core.step import Step
from advfunc.methods.toward_away import toward_away_step, weights


def cat(
    model: nn.Module,
    epsilon: float = 0.05,
    alpha: float = 0.01,
    steps: int = 10,
    norm: str = "l2",
    toward: float = 1.0,
    away: float = 1.0,
    utility: float = 1.0,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Step:
    """Continuous Adversarial Training (CAT, the unlikelihood variant) of a causal LM.

    .. math::
        δ_0 = 0,\\quad
        δ_t = Π_ε\\big(δ_{t-1} − α · \\operatorname{sign} ∇_δ L(θ, δ_{t-1};\\, x, \\tilde y)\\big),\\\\
        \\text{grads} = ∇_θ\\Big[w_t · L(θ, δ_K; x, y)
            + w_a · \\operatorname{mean}_t −\\log\\big(1 − p_θ(\\tilde y_t \\mid x + δ_K, \\tilde y_{<t})\\big)
            + w_u · L(θ, 0; x, y)\\Big]

    x is the prompt, y the desired completion (``labels``, −100 at the prompt and
    padding), ỹ the adversary's completion (``batch["adv_labels"]``, consumed by advfunc
    and never passed to the model), δ_K :func:`advfunc.attacks.cat`: sign-gradient
    descent on ỹ's loss at the prompt's input embeddings, per token in an L2 ball
    (``norm="l2"``) or L∞ box, held fixed in the final gradient. The weights are
    ``toward`` (w_t), ``away`` (w_a) and ``utility`` (w_u); the paper's utility loss is
    on separate benign data, here the clean loss of the batch's own completion (give
    benign rows with ``adv_labels`` equal to ``labels`` and ``toward=away=0`` to mix).

    ``out``: ``loss`` L(θ, 0; x, y), ``adv_loss`` L(θ, δ_K; x, y), ``delta`` δ_K
    [B, L, H], zero outside the prompt.

    Cost: K + 3 passes: K that differentiate δ only, then three forwards (toward, away,
    utility) with one shared backward; one pass fewer with ``away=0``, and with
    ``utility=0`` the utility forward runs without backward (for ``out.loss``).

    Paper: Xhonneux et al., "Efficient Adversarial Training in LLMs with Continuous
    Attacks", NeurIPS 2024.

    Example::

        cat_step = advfunc.cat(model, epsilon=0.05, alpha=0.01, steps=10)
        grads, out = cat_step(params, {**batch, "adv_labels": wrong_completion})
    """
    toward, away, utility = weights(toward, away, utility, "utility")
    attack = attacks.cat(model, epsilon, alpha, steps, norm, loss_fn=loss_fn, autocast=autocast, compile=compile)
    return toward_away_step("cat", attack, toward, away, utility, steps)
