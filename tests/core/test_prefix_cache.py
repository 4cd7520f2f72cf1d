"""δ-only passes at a decoder layer replay the layers before it: same grads, fewer layer forwards.

The oracle is the same step with the replay turned off (every δ-only pass runs the whole
model, as it did before the cache existed), on a tiny Llama and GPT-2, with and without
LoRA, with and without activation checkpointing: grads and δ within rtol 1e-5. Each case
also counts the attention calls of every layer, so a cache that silently stopped
skipping (or skipped a layer that δ reaches) fails it.
"""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.core.engine import Engine
from tests.support.tiny_decoders import completion_batch, tiny_decoder, tiny_lora_decoder

STACK = {"llama": "model.layers", "gpt2": "transformer.h"}
ATTENTION = {"llama": "self_attn", "gpt2": "attn"}
STEPS = 3


def _model(family: str, lora: bool, checkpointing: bool) -> torch.nn.Module:
    model = tiny_lora_decoder(family) if lora else tiny_decoder(family)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _step(method: str, model: torch.nn.Module, family: str, lora: bool) -> advfunc.Step:
    stack = ("base_model.model." if lora else "") + STACK[family]
    if method == "lat layer 0":
        return advfunc.lat(model, layers=f"{stack}.0", epsilon=1.0, alpha=0.5, steps=STEPS)
    if method == "lat inside layer 1":
        return advfunc.lat(model, layers=f"{stack}.1.mlp", epsilon=1.0, alpha=0.5, steps=STEPS)
    if method == "pgd layer 0":
        return advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=STEPS, target=f"{stack}.0")
    raise ValueError(method)


# δ-only passes per step: LAT's K; PGD's first ascent reads the clean pass's gradient.
DELTA_ONLY = {"lat layer 0": STEPS, "lat inside layer 1": STEPS, "pgd layer 0": STEPS - 1}
# layers whose forward the replayed passes skip
SKIPPED = {"lat layer 0": [0], "lat inside layer 1": [0], "pgd layer 0": [0]}


def _attention_calls(model: torch.nn.Module, family: str, lora: bool) -> tuple[list[int], list]:
    stack = model.get_submodule(("base_model.model." if lora else "") + STACK[family])
    counts = [0] * len(stack)
    handles = []
    for index, layer in enumerate(stack):

        def count(module, args, output, index=index):
            counts[index] += 1

        handles.append(getattr(layer, ATTENTION[family]).register_forward_hook(count))
    return counts, handles


def _run(method: str, family: str, lora: bool, checkpointing: bool):
    model = _model(family, lora, checkpointing)
    step = _step(method, model, family, lora)
    batch = completion_batch("left", adversary=method.startswith("lat"))
    counts, handles = _attention_calls(model, family, lora)
    try:
        grads, out = step(advfunc.params_of(model), batch)
    finally:
        for handle in handles:
            handle.remove()
    return model, grads, out, counts


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    x = torch.cat([a[k].flatten() for k in a])
    y = torch.cat([b[k].flatten() for k in a])
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(DELTA_ONLY))
def test_replayed_prefix_gives_the_grads_of_whole_model_passes(method, family, lora, checkpointing, monkeypatch):
    model, grads, out, counts = _run(method, family, lora, checkpointing)
    with monkeypatch.context() as patched:
        patched.setattr(Engine, "prefix_cache", lambda self: None)
        _, expected, expected_out, whole = _run(method, family, lora, checkpointing)

    assert _relative_error(grads, expected) <= 1e-5
    delta, expected_delta = out.delta, expected_out.delta
    assert float(expected_delta.norm()) > 0  # the attack moved δ: its passes were exercised
    torch.testing.assert_close(delta, expected_delta, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, expected_out.loss, rtol=1e-5, atol=0)
    # The first δ-only pass records; each later one skips the layers before the target.
    replayed = DELTA_ONLY[method] - 1
    for index, (with_cache, without) in enumerate(zip(counts, whole, strict=True)):
        assert with_cache == without - (replayed if index in SKIPPED[method] else 0), (index, counts, whole)
    assert not any("forward" in vars(module) for module in model.modules())  # every swap undone


def test_a_failing_pass_leaves_every_forward_as_it_was():
    model = tiny_decoder("llama")
    calls = [0]

    def loss_fn(outputs, batch):
        calls[0] += 1
        if calls[0] == 3:  # inside the first replayed pass
            raise RuntimeError("boom")
        return outputs.logits.float().logsumexp(-1).mean()

    step = advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=4, target="model.layers.1", loss_fn=loss_fn)
    with pytest.raises(RuntimeError, match="boom"):
        step(advfunc.params_of(model), completion_batch("right"))
    assert calls[0] == 3
    assert not any("forward" in vars(module) for module in model.modules())
    # and the model still runs its own layers
    with torch.no_grad():
        again = model(**completion_batch("right")).loss
        fresh = tiny_decoder("llama")(**completion_batch("right")).loss
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_parameters_are_untouched():
    model = tiny_lora_decoder("llama")
    before = {k: v.clone() for k, v in advfunc.params_of(model).items()}
    step = advfunc.lat(model, layers="base_model.model.model.layers.0", epsilon=1.0, alpha=0.5, steps=STEPS)
    step(advfunc.params_of(model), completion_batch("left", adversary=True))
    after = advfunc.params_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_stack_that_runs_twice_in_one_pass_is_never_replayed(monkeypatch):
    """A loss_fn that runs the model again calls each layer twice: the recording refuses to replay."""

    def runs_again(outputs, batch):
        other = model(input_ids=batch["input_ids"].flip(1), attention_mask=batch["attention_mask"].flip(1))
        return outputs.loss + 1e-3 * other.logits.float().square().mean()

    def run():
        step = advfunc.pgd(model, epsilon=0.1, alpha=0.05, steps=STEPS, target="model.layers.0", loss_fn=runs_again)
        counts, handles = _attention_calls(model, "llama", False)
        try:
            grads, out = step(advfunc.params_of(model), completion_batch("right"))
        finally:
            for handle in handles:
                handle.remove()
        return grads, out, counts

    model = tiny_decoder("llama")
    grads, out, counts = run()
    with monkeypatch.context() as patched:
        patched.setattr(Engine, "prefix_cache", lambda self: None)
        expected, expected_out, whole = run()
    assert counts == whole
    assert _relative_error(grads, expected) <= 1e-5
    torch.testing.assert_close(out.delta, expected_out.delta, rtol=1e-5, atol=1e-7)
