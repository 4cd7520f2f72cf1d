"""Representation rerouting (circuit breakers): LoRA that turns harmful hidden states away from the base model's."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from advfunc.core.arguments import require_non_negative
from advfunc.core.model import PerturbedModel
from advfunc.core.step import Grads, Step, StepOutput, prepare
from advfunc.core.targets import ModuleOutput
from advfunc.methods.residual import captured, harmful_rows, layer_target


def rerouting(
    model: nn.Module,
    layers: str | Sequence[str] | None = None,
    reroute: float = 1.0,
    retain: float = 1.0,
    *,
    autocast: torch.dtype | None = None,
) -> Step:
    """Representation rerouting of a PEFT (LoRA) causal LM: ``grads, out = step(params, batch)``.

    .. math::
        L_{rr} = \\operatorname{mean}_{l,\\, b \\in S,\\, t}
            \\operatorname{ReLU}\\big(\\cos(h^{(l)}_{b,t}, h^{(l)}_{ref,b,t})\\big),\\qquad
        L_{ret} = \\operatorname{mean}_{l,\\, b \\in R,\\, t} ‖h^{(l)}_{b,t} − h^{(l)}_{ref,b,t}‖₂,\\\\
        \\text{grads} = ∇_θ\\big[c_{rr} · L_{rr} + c_{ret} · L_{ret}\\big]

    h^{(l)} [B, L, H] is the residual stream each module of ``layers`` returns
    (``"model.layers.4"`` on the adapted base model, ``"base_model.model.model.layers.4"``
    on the ``PeftModel`` around it; several names; None: the middle decoder layer) with
    the adapters on; h_ref the same with every adapter layer off (what peft's
    ``disable_adapter()`` does), in a forward without gradient: the base model, with no
    second copy of it. S are the rows flagged in ``batch["harmful"]``
    ([B] bool, consumed by advfunc: the circuit-breaker set), R the others (the retain
    set); t runs over each row's real tokens (``attention_mask``), prompt and completion.
    The means are over those (layer, row, token) triples, 0 when a set has no row.
    c_rr = ``reroute`` and c_ret = ``retain``; the paper anneals them over training
    (c_rr = α(1 − t/2T), c_ret = α·t/2T), which a caller gets by building steps with the
    weights of each phase. No labels are needed; the model's loss is never computed.

    ``out``: ``loss`` L_ret, ``adv_loss`` L_rr, ``delta`` an empty tensor (nothing is
    perturbed), ``logits`` the adapted forward's logits.

    Cost: 1 forward+backward pass with the adapters, 1 forward-only pass without them.

    Paper: Zou et al., "Improving Alignment and Robustness with Circuit Breakers",
    NeurIPS 2024.

    Example::

        model = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        step = advfunc.rerouting(model, layers=["base_model.model.model.layers.10"])
        grads, out = step(advfunc.params_of(model), {**batch, "harmful": rows_flag})
    """
    adapters = adapter_layers(model)
    if not adapters:
        raise ValueError(
            f"rerouting trains adapters against the model without them, but {type(model).__name__} has no PEFT "
            "adapter layers; wrap it: model = peft.get_peft_model(model, peft.LoraConfig(...))"
        )
    reroute = require_non_negative("reroute", reroute)
    retain = require_non_negative("retain", retain)
    if reroute == 0 and retain == 0:
        raise ValueError("reroute and retain are both 0: the step would train on nothing")
    target = layer_target(model, layers)
    rerouted = _Rerouted(model, adapters, target, PerturbedModel(model, None, autocast), reroute, retain)
    config = {"layers": list(target.module_names), "reroute": reroute, "retain": retain, "forward_only_passes": 1}
    return Step("rerouting", 1, config, rerouted.step)


@dataclasses.dataclass(frozen=True)
class _Rerouted:
    """Rerouting bound to a PEFT model: the reference forward with adapters off, the adapted pass."""

    model: nn.Module
    adapters: list[Any]
    target: ModuleOutput
    perturbed: PerturbedModel
    reroute: float
    retain: float

    def step(
        self, params: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, loss_scale: float | torch.Tensor = 1.0
    ) -> tuple[Grads, StepOutput]:
        flagged, rest = harmful_rows(batch, "rerouting")
        call = prepare(self.model, self.perturbed, self.target, params, rest, loss_scale, needs_loss=False)
        assert call.layout.mask is not None
        real = call.layout.mask[..., 0].float()  # [B, L]
        flagged = flagged.to(call.device)
        names = self.target.module_names
        with torch.no_grad(), _adapters_off(self.adapters, self.model), captured(self.target) as seen:
            self.perturbed.outputs(call.params, call.kwargs, None)
            reference = {name: seen[name].float() for name in names}
        leaves = {n: call.params[n].detach().requires_grad_(True) for n in call.trainable}
        with captured(self.target) as seen:
            outputs = self.perturbed.outputs({**call.params, **leaves}, call.kwargs, None)
            hidden = {name: seen[name].float() for name in names}
        cut = real * flagged[:, None].float()  # [B, L]: the harmful rows' tokens
        kept = real * (~flagged)[:, None].float()
        rerouted = torch.stack([_masked_mean(torch.relu(_cosine(hidden[n], reference[n])), cut) for n in names]).mean()
        distance = torch.stack([_masked_mean(_distance(hidden[n], reference[n]), kept) for n in names]).mean()
        objective = self.reroute * rerouted + self.retain * distance
        found = torch.autograd.grad(
            objective * call.scale, list(leaves.values()), allow_unused=True, materialize_grads=True
        )
        logits = getattr(outputs, "logits", None)
        out = StepOutput(
            loss=distance.detach(),
            adv_loss=rerouted.detach(),
            delta=torch.zeros(0, device=call.device),
            skipped=torch.zeros((), dtype=torch.bool, device=call.device),
            logits=logits.detach() if isinstance(logits, torch.Tensor) else None,
        )
        return dict(zip(leaves, found, strict=True)), out


def adapter_layers(model: nn.Module) -> list[Any]:
    """The model's PEFT adapter layers: modules with ``enable_adapters(bool)`` and a ``disable_adapters`` flag."""
    return [
        module
        for module in model.modules()
        if callable(getattr(module, "enable_adapters", None))
        and isinstance(getattr(module, "disable_adapters", None), bool)
    ]


@contextlib.contextmanager
def _adapters_off(layers: list[Any], model: nn.Module) -> Iterator[None]:
    """Every adapter layer off for the block (peft's ``disable_adapter()``), then as it was, ``requires_grad`` included.

    peft freezes the adapter weights when it turns a layer off and unfreezes the active
    adapter's when it turns it on, which would undo a caller's own freezing.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_off = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, off in zip(layers, was_off, strict=True):
            layer.enable_adapters(not off)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, L]: cos of the angle between a and b per token, over the hidden axis (0 where either is 0)."""
    eps = torch.finfo(a.dtype).tiny
    return (a * b).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp(min=eps)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, L]: ‖a − b‖₂ per token; its gradient at a = b is 0 (the subgradient torch gives a norm at 0)."""
    return torch.linalg.vector_norm(a - b, dim=-1)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ values·weights / Σ weights, 0 when no weight is set."""
    return (values * weights).sum() / weights.sum().clamp(min=1)
