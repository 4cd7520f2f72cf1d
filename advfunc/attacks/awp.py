"""AWP's perturbation: relative ascent on selected weights inside a box (Wu et al., 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule, zero_init
from advfunc.core.arguments import require_positive, require_steps
from advfunc.core.model import LossFn
from advfunc.core.norms import l2_direction, l2_norm
from advfunc.core.params import Params
from advfunc.core.projection import project_linf
from advfunc.core.targets import Delta, Layout, NamedParameters, input_embedding


def awp_parameters(model: nn.Module) -> list[str]:
    """AWP's default selection: trainable parameters named ``*weight``, less embeddings and norms.

    Left out: the input-embedding matrix (found by identity with
    ``model.get_input_embeddings().weight``), the weight of every ``nn.Embedding``
    (positions, token types) and the weight of every normalisation layer (``nn.LayerNorm``,
    ``nn.RMSNorm`` or a class whose name ends in ``LayerNorm``/``RMSNorm``, such as
    ``T5LayerNorm`` or ``LlamaRMSNorm``): modules are told apart by type, never by name.
    """
    embedding = input_embedding(model)
    excluded = {id(p) for p in embedding.parameters()}
    for module in model.modules():
        if isinstance(module, nn.Embedding) or _is_norm(module):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and name.endswith("weight") and id(p) not in excluded
    ]


def _is_norm(module: nn.Module) -> bool:
    norm_types: tuple[type[nn.Module], ...] = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
    return isinstance(module, norm_types) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def awp_rule(target: NamedParameters, adv_lr: float, adv_eps: float, adv_steps: int) -> Rule:
    """One AWP update per parameter w (unperturbed), from δ₀ = 0.

    .. math::
        δ' = \\operatorname{clamp}\\big(δ + η · g/‖g‖₂ · ‖w + δ‖₂,\\; −b,\\; b\\big),\\quad b = ε · |w|

    so w + δ' stays in [w − ε|w|, w + ε|w|]. A zero or non-finite g leaves δ where it is.
    """

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        moved: Delta = {}
        finite_all = torch.ones((), dtype=torch.bool, device=next(iter(delta.values())).device)
        for name, value in delta.items():
            base = params[name].detach()
            direction, finite = l2_direction(grads[name])  # fp32, unit norm over the whole parameter
            finite_all = finite_all & finite
            weight_norm = l2_norm(base + value)  # fp32, keepdim
            ascended = (value.float() + adv_lr * direction * weight_norm).to(value.dtype)
            moved[name] = project_linf(ascended, adv_eps * base.abs())
        return moved, finite_all

    return Rule(zero_init(target), ascend, adv_steps)


def awp(
    model: nn.Module,
    adv_lr: float = 1.0,
    adv_eps: float = 0.01,
    adv_steps: int = 1,
    *,
    names: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> Attack:
    """Adversarial weight perturbation: ``delta = attack(params, batch, grads=None)``, {name: w_K − w}.

    .. math::
        w_0 = w,\\quad g_t = ∇_w L(w_{t-1}),\\quad
        w_t = \\operatorname{clamp}\\big(w_{t-1} + η · g_t/‖g_t‖₂ · ‖w_{t-1}‖₂,\\;
            w − ε|w|,\\; w + ε|w|\\big)

    for each selected weight w separately (η = ``adv_lr``, ε = ``adv_eps``, K =
    ``adv_steps``): the norms are per parameter tensor, the box is relative and
    elementwise. Default selection: :func:`awp_parameters`; ``names=[...]`` picks
    trainable parameters by exact name. ``grads`` is {name: ∇_w L} at w, which a
    training step's clean pass already holds. Cost: K passes that differentiate the
    selected weights only (K − 1 with ``grads``). Paper: Wu, Xia & Wang, "Adversarial
    Weight Perturbation Helps Robust Generalization", NeurIPS 2020; the relative step and
    box are those of the AWP class common in Kaggle NLP solutions.
    """
    adv_lr = require_positive("adv_lr", adv_lr)
    adv_eps = require_positive("adv_eps", adv_eps)
    adv_steps = require_steps("adv_steps", adv_steps)
    selected = awp_parameters(model) if names is None else _check_names(model, names)
    if not selected:
        raise ValueError("AWP found no trainable weight to perturb (all frozen, embeddings or norms); pass names=[...]")
    chosen = NamedParameters(selected, dict(model.named_parameters()))
    config = {
        "adv_lr": adv_lr,
        "adv_eps": adv_eps,
        "adv_steps": adv_steps,
        "names": tuple(selected),
        "target": "params",
    }
    rule = awp_rule(chosen, adv_lr, adv_eps, adv_steps)
    return Attack("awp", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, compile=compile)


def _check_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a list of parameter names, got {names!r}")
    chosen = NamedParameters(names, dict(model.named_parameters()))  # unknown and repeated names raise here
    frozen = [name for name, p in model.named_parameters() if name in chosen.names and not p.requires_grad]
    if frozen:
        raise ValueError(
            f"names {frozen} are frozen (requires_grad=False): AWP needs their gradient; "
            f"trainable candidates are in advfunc.trainable_names(model)"
        )
    return list(chosen.names)
