"""Every method under non-reentrant activation checkpointing gives the grads it gives without it.

The oracle is the same step on an identical model without checkpointing (relative error
of the whole gradient vector <= 1e-5), on a tiny Llama and GPT-2, with and without LoRA
adapters. Each case also counts the checkpointed layer calls, so a model that silently
stopped checkpointing would fail it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

import advfunc
from advfunc.methods.plain import plain
from tests.support.tiny_decoders import completion_batch, tiny_decoder

LAYER = {"llama": "model.layers.0", "gpt2": "transformer.h.0"}
SUBLAYER = {"llama": "model.layers.0.mlp", "gpt2": "transformer.h.0.mlp"}  # inside a checkpointed layer
LORA_MODULES = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _methods(family: str, prefix: str) -> dict[str, tuple[object, bool]]:
    """name -> (factory(model), whether the batch carries the adversary's completion)."""
    layer, sublayer = prefix + LAYER[family], prefix + SUBLAYER[family]
    return {
        "none": (lambda m: plain(m), False),
        "fgm embeds": (lambda m: advfunc.fgm(m, epsilon=0.1, target="embeds"), False),
        "pgd embeds": (lambda m: advfunc.pgd(m, epsilon=0.1, alpha=0.05, steps=2, target="embeds"), False),
        "pgd layer": (lambda m: advfunc.pgd(m, epsilon=0.1, alpha=0.05, steps=2, target=layer), False),
        "pgd sublayer": (lambda m: advfunc.pgd(m, epsilon=0.1, alpha=0.05, steps=2, target=sublayer), False),
        "freelb": (lambda m: advfunc.freelb(m, steps=2, lr=0.05, init_mag=0.01, generator=_generator()), False),
        "vat": (lambda m: advfunc.vat(m, generator=_generator()), False),
        "r3f": (lambda m: advfunc.r3f(m, generator=_generator()), False),
        "awp": (lambda m: advfunc.awp(m, adv_lr=0.1, adv_eps=0.05), False),
        "neftune": (lambda m: advfunc.neftune(m, generator=_generator()), False),
        "smart": (lambda m: advfunc.smart(m, noise_var=1e-3, step_size=0.01, epsilon=0.01), False),
        "free_at": (lambda m: advfunc.free_at(m, epsilon=0.05), False),
        "cat": (lambda m: advfunc.cat(m, epsilon=0.5, alpha=0.1, steps=2), True),
        "lat": (lambda m: advfunc.lat(m, layers=layer, epsilon=1.0, alpha=0.5, steps=2), True),
        "lat sublayer": (lambda m: advfunc.lat(m, layers=sublayer, epsilon=1.0, alpha=0.5, steps=2), True),
    }


def _model(family: str, lora: bool, checkpointing: bool) -> torch.nn.Module:
    model = tiny_decoder(family)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        # random B (not PEFT's zero start): the adapters' gradients are then all non-zero
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=LORA_MODULES[family],
            lora_dropout=0.0,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model.train()


def _count_checkpointed_calls(model: torch.nn.Module) -> list[int]:
    count = [0]
    for layer in model.modules():
        if getattr(layer, "gradient_checkpointing", False) is True and hasattr(layer, "_gradient_checkpointing_func"):
            inner = layer._gradient_checkpointing_func

            def counted(function, *args, _inner=inner, **kwargs):
                count[0] += 1
                return _inner(function, *args, **kwargs)

            layer._gradient_checkpointing_func = counted
    return count


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].flatten() for name in sorted(grads)])


CASES = [
    (family, lora, method)
    for family in ("llama", "gpt2")
    for lora in (False, True)
    for method in _methods(family, "")
    if not (lora and method == "none")
]


@pytest.mark.parametrize("family,lora,method", CASES, ids=[f"{f}-{'lora' if lo else 'full'}-{m}" for f, lo, m in CASES])
def test_grads_with_checkpointing_equal_those_without(family, lora, method):
    prefix = "base_model.model." if lora else ""
    build, adversary = _methods(family, prefix)[method]
    runs = []
    for checkpointing in (False, True):
        model = _model(family, lora, checkpointing)
        calls = _count_checkpointed_calls(model)
        step = advfunc.stateful(build(model))
        params = advfunc.params_of(model)
        state = step.init(params)
        grads = {}
        for seed, padding in enumerate(("right", "left")):
            batch = completion_batch(padding, seed=seed, adversary=adversary)
            grads, _, state = step.update(params, batch, state)
            state = step.after_update(state, params)
        runs.append((_flat(grads), calls[0]))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs
    assert plain_calls == 0 and checkpointed_calls > 0, "the checkpointed model never checkpointed a layer"
    assert float(plain.norm()) > 0
    error = float((checkpointed - plain).norm() / plain.norm())
    assert error <= 1e-5, f"relative error {error:.3g}"


def test_the_model_keeps_its_own_checkpoint_functions():
    model = _model("llama", lora=False, checkpointing=True)
    before = {
        name: m._gradient_checkpointing_func
        for name, m in model.named_modules()
        if hasattr(m, "gradient_checkpointing")
    }
    advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=2, target="embeds")(
        advfunc.params_of(model), completion_batch("right")
    )
    after = {
        name: m._gradient_checkpointing_func
        for name, m in model.named_modules()
        if hasattr(m, "gradient_checkpointing")
    }
    assert after == before


def test_reentrant_checkpointing_is_refused_with_the_fix():
    model = tiny_decoder("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    step = advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=2, target="embeds")
    with pytest.raises(ValueError, match=r"use_reentrant.*False"):
        step(advfunc.params_of(model), completion_batch("right"))


def test_a_context_fn_of_the_users_still_runs_in_forward_and_recompute():
    model = tiny_decoder("llama")
    entered = []

    def contexts():
        @contextlib.contextmanager
        def mark(what):
            entered.append(what)
            yield

        return mark("forward"), mark("recompute")

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": contexts})
    plain = tiny_decoder("llama")
    step = advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=2, target="embeds")
    grads, _ = step(advfunc.params_of(model), completion_batch("right"))
    reference, _ = advfunc.pgd(plain, epsilon=0.1, alpha=0.05, steps=2, target="embeds")(
        advfunc.params_of(plain), completion_batch("right")
    )
    assert "forward" in entered and "recompute" in entered
    error = float((_flat(grads) - _flat(reference)).norm() / _flat(reference).norm())
    assert error <= 1e-5


def test_a_compiled_step_is_refused_under_checkpointing():
    model = _model("llama", lora=False, checkpointing=True)
    with pytest.raises(ValueError, match="compile=False"):
        advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=2, target="embeds", compile=True)
