"""Targeted LAT's attack: PGD on residual-stream activations at the prompt (Sheshadri et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advfunc.attacks.cat import CompletionAttack, descent_rule, token_l2_direction
from advfunc.core.arguments import require_positive, require_steps
from advfunc.core.model import LossFn
from advfunc.core.targets import ModuleOutput, resolve_target


def middle_layer(model: nn.Module) -> str:
    """The name of the middle block of the model's first ``nn.ModuleList`` (a decoder's layer stack)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return f"{name}.{len(module) // 2}"
    raise ValueError(
        f"{type(model).__name__} has no nn.ModuleList of layers to default to; name them: layers='model.layers.4'"
    )


def lat(
    model: nn.Module,
    layers: str | Sequence[str] | None = None,
    epsilon: float = 1.0,
    alpha: float = 0.25,
    steps: int = 8,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> CompletionAttack:
    """Targeted latent adversarial attack: ``delta = attack(params, batch)``, [B, L, H] per layer.

    .. math::
        δ^{(l)}_0 = 0,\\quad
        δ^{(l)}_t = Π_ε\\big(δ^{(l)}_{t-1} − α · g^{(l)}_t / ‖g^{(l)}_t‖₂\\big),\\quad
        g^{(l)}_t = ∇_{δ^{(l)}} L(θ, δ_{t-1};\\, x, \\tilde y)

    δ^{(l)} is added to the hidden states module l returns (``layers``: one submodule
    name such as ``"model.layers.4"``, or several; None: the middle layer of the model's
    layer stack, :func:`middle_layer`), at the prompt's positions only; L is
    the loss of the adversary's completion ỹ (``batch["adv_labels"]``). The norm and the
    ball Π_ε are per token over the hidden axis (L2), as in the paper. The authors step
    δ with Adam from a random start; here the step is normalised gradient descent from
    δ = 0, a deterministic PGD. Returns one tensor for one layer, a ``{name: tensor}``
    dict for several. ``grads`` is accepted for the protocol and never read.

    Cost: K passes that differentiate δ only; all but the first run only the layers
    after the target's (:mod:`advfunc.core.prefix`). Paper: Sheshadri et al., "Latent
    Adversarial Training Improves Robustness to Persistent Harmful Behaviors in LLMs"
    (targeted LAT), 2024; Casper et al., "Defending Against Unforeseen Failure Modes
    with Latent Adversarial Training", 2024.

    Example::

        attack = advfunc.attacks.lat(model, layers="model.layers.4", epsilon=1.0, steps=8)
        delta = attack(params, {**batch, "adv_labels": adversary_completion})   # [B, L, H]
    """
    epsilon = require_positive("epsilon", epsilon)
    alpha = require_positive("alpha", alpha)
    steps = require_steps("steps", steps)
    if layers is None:
        layers = middle_layer(model)
    names = [layers] if isinstance(layers, str) else list(layers)
    chosen = resolve_target(model, [f"{name}@prompt" for name in names], allowed=("embeds",))
    if not isinstance(chosen, ModuleOutput):
        raise ValueError(f"layers must name submodules of the model (such as 'model.layers.4'), got {layers!r}")
    config = {"layers": names, "epsilon": epsilon, "alpha": alpha, "steps": steps, "target": "module@prompt"}
    rule = descent_rule(chosen, epsilon, alpha, steps, "l2", token_l2_direction)
    return CompletionAttack("lat", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, compile=compile)
