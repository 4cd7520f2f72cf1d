"""ASCC's perturbation: the worst sparse convex combination of each token's synonyms (Dong et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule
from advfunc.attacks.synonyms import (
    SynonymEmbeddings,
    SynonymTable,
    combination,
    neighbours_of,
    require_own_start,
    synonym_target,
    weight_gradient,
)
from advfunc.core.arguments import require_non_negative, require_positive, require_steps
from advfunc.core.divergence import kl_logits
from advfunc.core.model import LossFn
from advfunc.core.params import Params
from advfunc.core.step import Call
from advfunc.core.targets import Delta, Layout

# Adam's constants (Kingma & Ba), which the ASCC reference implementation keeps.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
OBJECTIVES = ("kl", "loss")


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax over the valid entries of the last axis, exactly 0 elsewhere: [..., N]."""
    return torch.softmax(logits.float().masked_fill(~valid, float("-inf")), dim=-1)


def entropy_gradient(weights: torch.Tensor) -> torch.Tensor:
    """∂H/∂z for H = −Σ w log w, w = softmax(z): −w ⊙ (log w + H), 0 where w = 0. [..., N]."""
    plogp = torch.xlogy(weights, weights)
    entropy = -plogp.sum(dim=-1, keepdim=True)
    return -(plogp + weights * entropy)


def ascc_rule(target: SynonymEmbeddings, steps: int, lr: float, sparsity: float) -> Rule:
    """z₀ = 0 (uniform weights); Adam ascent on J(z) = B · objective(δ(softmax z)) − sparsity · mean H(w).

    The iterate carries δ with Adam's state: ``logits`` z, ``first``/``second`` moments,
    ``count`` t and ``scale`` (the call's loss scale, divided out of each gradient).
    """

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        layout = call.layout
        valid = neighbours_of(layout).valid
        logits = torch.zeros(valid.shape, dtype=torch.float32, device=call.device)  # [B, L, N]
        weights = masked_softmax(logits, valid)
        delta = combination(weights, target.embeddings(call.params, layout), layout, target.dtype)
        zeros = torch.zeros_like(logits)
        count = torch.zeros((), dtype=torch.float32, device=call.device)
        return {
            "embeds": delta,
            "logits": logits,
            "first": zeros,
            "second": zeros,
            "count": count,
            "scale": call.scale.detach().float(),
        }

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        require_own_start(delta, "logits", "ascc")
        valid = neighbours_of(layout).valid
        batch, length = layout.shape[0], layout.shape[1]
        neighbours = target.embeddings(params, layout)  # [B, L, N, H]
        weights = masked_softmax(delta["logits"], valid)
        # The reference implementation sums the objective over the batch and averages the entropy over B·L positions.
        per_weight = weight_gradient(grads["embeds"], neighbours) * (batch / delta["scale"])  # [B, L, N]
        loss_part = weights * (per_weight - (weights * per_weight).sum(dim=-1, keepdim=True))
        gradient = loss_part - sparsity / (batch * length) * entropy_gradient(weights)
        finite = torch.isfinite(gradient).all()
        gradient = torch.where(torch.isfinite(gradient), gradient, torch.zeros_like(gradient)) * valid
        count = delta["count"] + 1
        first = BETA1 * delta["first"] + (1 - BETA1) * gradient
        second = BETA2 * delta["second"] + (1 - BETA2) * gradient * gradient
        step = lr * (first / (1 - BETA1**count)) / ((second / (1 - BETA2**count)).sqrt() + EPS)
        logits = delta["logits"] + step
        moved = combination(masked_softmax(logits, valid), neighbours, layout, delta["embeds"].dtype)
        return {
            "embeds": moved,
            "logits": logits,
            "first": first,
            "second": second,
            "count": count,
            "scale": delta["scale"],
        }, finite

    def finish(delta: Delta) -> Delta:  # the logits give the training step the weights of δ
        return {"embeds": delta["embeds"], "logits": delta["logits"]}

    return Rule(init, ascend, steps, reads_grads=False, finish=finish)


def ascc(
    model: nn.Module,
    synonyms: SynonymTable,
    steps: int = 5,
    lr: float = 1.0,
    sparsity: float = 10.0,
    objective: str = "kl",
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Attack:
    """ASCC's adversarial convex combination on the embedding output: ``delta = attack(params, batch)`` [B, L, H].

    .. math::
        w_{b,l} = \\mathrm{softmax}(z_{b,l}) \\text{ over } \\{x_{b,l}\\} ∪ S(x_{b,l}),\\quad
        δ_{b,l} = \\sum_j w_{b,l,j}\\, e(n_j) − e(x_{b,l}),\\\\
        \\max_z\\; B · \\mathcal{O}(θ, δ) − \\frac{\\text{sparsity}}{B L} \\sum_{b,l} H(w_{b,l})

    𝒪 is KL(p(·|x) ‖ p(·|x + δ)) (``objective="kl"``, ASCC's training attack, no labels
    needed) or the loss (``"loss"``); B·𝒪 is the reference implementation's sum over the
    batch, and the entropy penalty (averaged over all B·L positions, as there) drives w
    to a vertex: a real word substitution. z starts at 0 (uniform w) and takes ``steps``
    Adam steps of rate ``lr`` (β = 0.9, 0.999, ε = 1e-8) on the analytic gradient ∂/∂z
    through ∂𝒪/∂δ; the reference draws near-zero starting logits and adds an Adam weight
    decay of 2e-5 on z, both left out here. S(x) is the token's row of ``synonyms``
    (:class:`advfunc.attacks.SynonymTable`); δ = 0 at padding and at tokens without
    synonyms. The input embedding must be a plain ``nn.Embedding``.

    Cost: one forward for p(·|x) (``"kl"``) and ``steps`` passes that differentiate δ only;
    memory [B, L, 1 + K, H] for the neighbours' embeddings. Paper: Dong, Luu, Ji & Liu,
    "Towards Robustness Against Natural Language Word Substitutions", ICLR 2021.
    """
    steps = require_steps("steps", steps)
    lr = require_positive("lr", lr)
    sparsity = require_non_negative("sparsity", sparsity)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    chosen = synonym_target(model, synonyms)
    config = {"steps": steps, "lr": lr, "sparsity": sparsity, "objective": objective, "target": "embeds"}
    rule = ascc_rule(chosen, steps, lr, sparsity)
    return Attack(
        "ascc",
        model,
        chosen,
        rule,
        config,
        loss_fn=loss_fn,
        autocast=autocast,
        compile=compile,
        divergence=kl_logits if objective == "kl" else None,
    )
