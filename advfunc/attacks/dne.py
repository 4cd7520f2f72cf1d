"""DNE's perturbation: a Dirichlet draw in each token's synonym hull, then ascent on the simplex (Zhou et al., 2021)."""

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
from advfunc.core.arguments import LARGEST, require_positive, require_steps
from advfunc.core.model import LossFn
from advfunc.core.noise import require_generator
from advfunc.core.norms import l2_direction
from advfunc.core.params import Params
from advfunc.core.step import Call
from advfunc.core.targets import Delta, Layout

# Marsaglia–Tsang proposals drawn per entry: each is accepted with probability > 0.95 for
# shape >= 1, so all 8 fail with probability < 4e-11 (the entry then takes its mode-like d).
PROPOSALS = 8


def gamma(shape: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(shape, 1) draws [...] float32 on ``shape``'s device, from ``generator``, with no host read.

    Marsaglia & Tsang (2000): d = a − 1/3, c = 1/√(9d), x ~ N(0, 1), v = (1 + c x)³,
    accepted when log U < x²/2 + d − d v + d log v; the draw is d v. Shapes below 1 are
    boosted: Gamma(a) = Gamma(a + 1) · U^{1/a}. A fixed number of proposals (one batch of
    normals, then one of uniforms, then the boost's uniforms) keeps the draw order fixed.
    """
    a = shape.float()
    boosted = torch.where(a < 1, a + 1, a)
    d = boosted - 1 / 3
    c = torch.rsqrt(9 * d)
    x = torch.randn((PROPOSALS, *a.shape), generator=generator, device=a.device)
    u = torch.rand((PROPOSALS, *a.shape), generator=generator, device=a.device)
    v = (1 + c * x) ** 3
    positive = v > 0
    log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
    accepted = positive & (torch.log(u) < 0.5 * x * x + d - d * v + d * log_v)
    first = accepted.int().argmax(dim=0, keepdim=True)  # the first accepted proposal (0 when none)
    draw = d * torch.where(accepted.any(dim=0), v.gather(0, first).squeeze(0), torch.ones_like(d))
    boost = torch.rand(a.shape, generator=generator, device=a.device).pow(1 / a)
    return torch.where(a < 1, draw * boost, draw)


def dirichlet(concentration: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """w ~ Dir(concentration) over the valid entries of the last axis, 0 elsewhere: [..., N] float32.

    Normalised :func:`gamma` draws. A row whose draws all underflow to 0 (a tiny
    concentration) keeps all its weight on column 0, the token itself.
    """
    draws = gamma(torch.where(valid, concentration, torch.ones_like(concentration)), generator) * valid
    total = draws.sum(dim=-1, keepdim=True)
    vertex = (torch.arange(draws.shape[-1], device=draws.device) == 0).to(draws.dtype)  # [N]: the token itself
    return torch.where(total > 0, draws / torch.where(total > 0, total, torch.ones_like(total)), vertex)


def project_simplex(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``values`` onto the simplex of its valid entries: [..., N].

    max(v − τ, 0) with τ from the sorted values (Duchi et al., 2008); invalid entries are 0.
    """
    values = values.float()
    ordered = torch.where(valid, values, torch.full_like(values, float("-inf"))).sort(dim=-1, descending=True).values
    real = torch.isfinite(ordered)
    sums = torch.where(real, ordered, torch.zeros_like(ordered)).cumsum(dim=-1) - 1  # [..., N]
    counts = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=values.dtype)
    # ≥ 1: the largest entry always belongs (in exact arithmetic; the clamp covers round-off at huge values).
    support = (real & (ordered > sums / counts)).sum(dim=-1, keepdim=True).clamp_min(1)
    tau = sums.gather(-1, support - 1) / support
    return (values - tau).clamp_min(0) * valid


def dne_rule(target: SynonymEmbeddings, steps: int, step_size: float, alpha: float, decay: float) -> Rule:
    """w₀ ~ Dir(α at hops 0–1, α·decay at hop 2); w_t = Π_Δ(w_{t-1} + step_size · g_t/‖g_t‖₂), per token."""

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        layout = call.layout
        neighbourhood = neighbours_of(layout)
        valid, hop = neighbourhood.valid, neighbourhood.hop
        concentration = torch.where(hop == 2, alpha * decay, alpha).float()
        weights = dirichlet(concentration, valid, generator)  # [B, L, N]
        delta = combination(weights, target.embeddings(call.params, layout), layout, target.dtype)
        return {"embeds": delta, "weights": weights}

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        require_own_start(delta, "weights", "dne")
        valid = neighbours_of(layout).valid
        neighbours = target.embeddings(params, layout)  # [B, L, N, H]
        gradient = weight_gradient(grads["embeds"], neighbours) * valid  # [B, L, N]
        direction, finite = l2_direction(gradient, (2,))
        weights = project_simplex(delta["weights"] + step_size * direction, valid)
        moved = combination(weights, neighbours, layout, delta["embeds"].dtype)
        return {"embeds": moved, "weights": weights}, finite

    def finish(delta: Delta) -> Delta:
        return {"embeds": delta["embeds"]}

    return Rule(init, ascend, steps, reads_grads=False, finish=finish)


def dne(
    model: nn.Module,
    synonyms: SynonymTable,
    steps: int = 3,
    step_size: float = 1.0,
    alpha: float = 1.0,
    decay: float = 0.5,
    width: int = 32,
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Attack:
    """DNE's adversarial point of each token's neighbourhood hull: ``delta = attack(params, batch)`` [B, L, H].

    .. math::
        w_0 \\sim \\mathrm{Dir}(α_j),\\; α_j = α \\text{ (the token, its synonyms)},\\;
        α · \\text{decay} \\text{ (their synonyms)},\\\\
        g_t = \\big(⟨∇_δ L(θ, δ_{t-1}), e(n_j)⟩\\big)_j,\\quad
        w_t = Π_Δ\\big(w_{t-1} + \\text{step\\_size} · g_t / ‖g_t‖₂\\big),\\quad
        δ_t = \\sum_j w_{t,j}\\, e(n_j) − e(x)

    The neighbourhood of x is x, its synonyms and their synonyms (the paper's two-hop
    expansion), each id once, synonyms first, cut at ``width`` columns; ‖·‖₂ and the
    Euclidean projection Π_Δ onto the simplex are per token, over its neighbourhood.
    δ = 0 at padding and at tokens without synonyms. w₀ is drawn by :func:`dirichlet`
    from ``generator``. Returns δ_K. The input embedding must be a plain ``nn.Embedding``.

    Cost: ``steps`` passes that differentiate δ only; memory [B, L, width, H] for the
    neighbours' embeddings. Paper: Zhou, Zheng, Hsieh, Chang & Huang, "Defense against
    Synonym Substitution-based Adversarial Attacks via Dirichlet Neighborhood Ensemble",
    ACL 2021.
    """
    steps = require_steps("steps", steps)
    step_size = require_positive("step_size", step_size)
    alpha = require_positive("alpha", alpha)
    decay = require_positive("decay", decay)
    if not 0 < alpha * decay <= LARGEST:
        raise ValueError(
            f"alpha · decay (the concentration of synonyms' synonyms) must be > 0 and at most {LARGEST:.2g},"
            f" got alpha={alpha} · decay={decay}: lower alpha or decay"
        )
    width = require_steps("width", width)
    if width < 2:
        raise ValueError(f"width must be at least 2 (the token and one synonym), got {width}")
    chosen = synonym_target(model, synonyms, width)
    config = {
        "steps": steps,
        "step_size": step_size,
        "alpha": alpha,
        "decay": decay,
        "width": width,
        "target": "embeds",
    }
    rule = dne_rule(chosen, steps, step_size, alpha, decay)
    return Attack(
        "dne",
        model,
        chosen,
        rule,
        config,
        loss_fn=loss_fn,
        autocast=autocast,
        compile=compile,
        generator=require_generator(generator),
    )
