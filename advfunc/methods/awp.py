"""AWP: adversarial weight perturbation, as NLP practitioners run it (Wu et al., 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from advfunc.arguments import require_positive, require_steps
from advfunc.engine import Engine, resolve_compile
from advfunc.forward import LossFn, PerturbedModel
from advfunc.norms import l2_direction, l2_norm
from advfunc.projection import project_linf
from advfunc.step import Grads, Step, StepOutput, as_scale, drop_if_skipped, prepare, report, zero_delta
from advfunc.targets import Delta, NamedParameters, input_embedding


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


def awp_ascent(delta: Delta, grads: Delta, base: Delta, bound: Delta, adv_lr: float) -> tuple[Delta, torch.Tensor]:
    """One AWP update per parameter, and whether every gradient was finite.

    .. math::
        δ' = \\operatorname{clamp}\\big(δ + η · g/‖g‖₂ · ‖w + δ‖₂,\\; −b,\\; b\\big),\\quad b = ε · |w|

    with w the unperturbed weight, so w + δ' stays in [w − ε|w|, w + ε|w|]. A zero or
    non-finite g leaves δ where it is.
    """
    moved: Delta = {}
    finite_all = torch.ones((), dtype=torch.bool, device=next(iter(delta.values())).device)
    for name, value in delta.items():
        direction, finite = l2_direction(grads[name])  # fp32, unit norm over the whole parameter
        finite_all = finite_all & finite
        weight_norm = l2_norm(base[name] + value)  # fp32, keepdim
        ascended = (value.float() + adv_lr * direction * weight_norm).to(value.dtype)
        moved[name] = project_linf(ascended, bound[name])
    return moved, finite_all


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
) -> Step:
    """Adversarial Weight Perturbation: train on the clean loss and the loss at perturbed weights.

    .. math::
        w_0 = w,\\quad g_t = ∇_w L(w_{t-1}),\\quad
        w_t = \\operatorname{clamp}\\big(w_{t-1} + η · g_t/‖g_t‖₂ · ‖w_{t-1}‖₂,\\;
            w − ε|w|,\\; w + ε|w|\\big),\\\\
        \\text{grads} = ∇_θ L(θ) + ∇_θ L(θ)\\big|_{w = w_K}

    for each selected weight w separately (η = ``adv_lr``, ε = ``adv_eps``, K =
    ``adv_steps``): the norms are per parameter tensor, the box is relative and
    elementwise. Default selection: :func:`awp_parameters`; ``names=[...]`` picks
    trainable parameters by exact name. The perturbed weights are only a params dict
    handed to ``functional_call``; the model's tensors are never written.

    ``out``: ``loss`` the clean loss, ``adv_loss`` the loss at w_K, ``delta`` the dict
    {name: w_K − w}.

    Cost: K + 1 forward+backward passes: the clean pass (g_1 comes with it), K − 1
    passes that differentiate the selected weights only, the full pass at w_K.

    Paper: Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust Generalization",
    NeurIPS 2020; the relative step and box are those of the AWP class common in
    Kaggle NLP solutions.

    Example::

        awp_step = advfunc.awp(model, adv_lr=1.0, adv_eps=0.01)
        grads, out = awp_step(advfunc.params_of(model), batch)
        advfunc.set_grads(model, grads); optimizer.step()
    """
    adv_lr = require_positive("adv_lr", adv_lr)
    adv_eps = require_positive("adv_eps", adv_eps)
    adv_steps = require_steps("adv_steps", adv_steps)
    selected = awp_parameters(model) if names is None else _check_names(model, names)
    if not selected:
        raise ValueError("AWP found no trainable weight to perturb (all frozen, embeddings or norms); pass names=[...]")
    chosen = NamedParameters(selected, dict(model.named_parameters()))
    perturbed = PerturbedModel(model, loss_fn, autocast)
    engine = Engine(perturbed, chosen, resolve_compile(compile, model))

    def step(
        params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        call = prepare(model, perturbed, chosen, params, batch)
        scale = as_scale(loss_scale, call.device)
        base = {name: call.params[name].detach() for name in selected}
        bound = {name: adv_eps * weight.abs() for name, weight in base.items()}
        delta = zero_delta(chosen, call)
        clean = engine.full(
            call.params, call.trainable, call.kwargs, call.layout, delta, with_delta_grad=False, scale=scale
        )
        # The selected weights are trainable, so their clean gradient is g_1: no extra pass.
        grads_at = {name: clean.param_grads[name] for name in selected}
        skipped = torch.zeros((), dtype=torch.bool, device=call.device)
        for t in range(adv_steps):
            if t > 0:
                grads_at = engine.delta_only(call.params, call.kwargs, call.layout, delta, scale)
            delta, finite = awp_ascent(delta, grads_at, base, bound, adv_lr)
            skipped = skipped | ~finite
        delta = drop_if_skipped(delta, skipped)
        adv = engine.full(
            call.params,
            call.trainable,
            call.kwargs,
            call.layout,
            delta,
            with_delta_grad=False,
            scale=scale,
            accumulate_into=clean.param_grads,
        )
        grads = adv.param_grads  # clean + adversarial, summed in the clean pass's buffers
        return grads, report(chosen, call.layout, delta, clean.loss, adv.loss, skipped, clean.logits)

    config = {
        "adv_lr": adv_lr,
        "adv_eps": adv_eps,
        "adv_steps": adv_steps,
        "names": tuple(selected),
        "target": "params",
        "forward_only_passes": 0,
    }
    return Step("awp", adv_steps + 1, config, step)


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
