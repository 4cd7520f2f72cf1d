"""Targeted LAT training: toward, away and retain losses under a residual-stream attack (Sheshadri et al., 2024)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from advfunc import attacks
from advfunc.core.model import LossFn
from advfunc.core.stateful import StatefulStep
from advfunc.core.step import Step
from advfunc.methods.teacher import copy_of_trainable, passing
from advfunc.methods.toward_away import toward_away_step, weights


def lat(
    model: nn.Module,
    layers: str | Sequence[str] | None = None,
    epsilon: float = 1.0,
    alpha: float = 0.25,
    steps: int = 8,
    toward: float = 1.0,
    away: float = 1.0,
    retain: float = 1.0,
    retain_kl: bool = False,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | None = None,
) -> StatefulStep:
    """Targeted Latent Adversarial Training of a causal LM: ``step(params, batch, reference=None)``.

    .. math::
        δ^{(l)}_t = Π_ε\\big(δ^{(l)}_{t-1} − α · g^{(l)}_t/‖g^{(l)}_t‖₂\\big),\\quad
        g^{(l)}_t = ∇_{δ^{(l)}} L(θ, δ_{t-1};\\, x, \\tilde y),\\\\
        \\text{grads} = ∇_θ\\Big[w_t · L(θ, δ_K; x, y)
            + w_a · \\operatorname{mean}_t −\\log\\big(1 − p_θ(\\tilde y_t \\mid x, \\tilde y_{<t}; δ_K)\\big)
            + w_r · R(θ)\\Big]

    δ^{(l)} [B, L, H] is added to the hidden states each module of ``layers`` returns
    (``"model.layers.4"``, or several names; None: the middle decoder layer,
    :func:`advfunc.attacks.lat.middle_layer`), at the prompt's positions only, per token
    in an L2 ball of radius ε (:func:`advfunc.attacks.lat`), and held fixed in the final
    gradient. y is the desired completion (``labels``), ỹ the adversary's
    (``batch["adv_labels"]``, consumed by advfunc). The retain term R is the clean loss of
    y (SFT) or, when ``reference`` parameters are given (a frozen copy:
    :func:`advfunc.teacher_of` of the starting params), KL(p_θ ‖ p_ref) over y's
    positions at the clean input, as the authors' KL penalty. The weights are
    ``toward``, ``away`` and ``retain``.

    ``retain_kl=True`` makes the stateful protocol (:func:`advfunc.stateful`, the
    Trainer) carry that reference: ``step.init(params)`` copies the trainable parameters
    at the start of training and ``step.update`` passes them as ``reference``. For LoRA
    adapters started as PEFT starts them (B = 0), the reference is the base model with the
    adapters disabled, and the copy holds the adapter weights only.

    ``out``: ``loss`` L(θ, 0; x, y), ``adv_loss`` L(θ, δ_K; x, y), ``delta`` δ_K
    (one tensor for one layer, a dict for several).

    Cost: K + 3 passes: K that differentiate δ only (all but the first run only the
    layers after the target's, :mod:`advfunc.core.prefix`), then three forwards (toward,
    away, retain) with one shared backward; one pass fewer with ``away=0``, and with
    ``retain=0`` the retain forward runs without backward (for ``out.loss``); one more
    forward without backward for the reference when given.

    Paper: Sheshadri et al., "Latent Adversarial Training Improves Robustness to
    Persistent Harmful Behaviors in LLMs", 2024.

    Example::

        lat_step = advfunc.lat(model, layers="model.layers.4", epsilon=1.0, steps=8)
        grads, out = lat_step(params, {**batch, "adv_labels": harmful_completion})
    """
    toward, away, retain = weights(toward, away, retain, "retain")
    if not isinstance(retain_kl, bool):
        raise TypeError(f"retain_kl must be True or False, got {retain_kl!r}")
    if retain_kl and retain == 0:
        raise ValueError("retain_kl=True needs retain > 0: the KL is the retain term")
    attack = attacks.lat(model, layers, epsilon, alpha, steps, loss_fn=loss_fn, autocast=autocast, compile=compile)
    step = toward_away_step("lat", attack, toward, away, retain, steps)
    fields = {f.name: getattr(step, f.name) for f in dataclasses.fields(Step)}
    forward_only = step.config["forward_only_passes"] + retain_kl  # the reference's forward
    fields["config"] = {**step.config, "retain_kl": retain_kl, "forward_only_passes": forward_only}
    if not retain_kl:
        return StatefulStep(**fields)
    return StatefulStep(**fields, start=copy_of_trainable(model, "reference"), carry=passing("reference"))
