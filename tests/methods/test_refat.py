"""ReFAT against a hand-written reference: forward hooks on a twin model, ``.backward()``, no advfunc.

The reference computes the refusal direction from the two prompt sets with hooks of its
own, ablates it from the residual stream of the chosen rows in the ordinary imperative
way and reads ``p.grad``.
"""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc.methods.registry import METHODS, build_step, parse_method
from tests.support.method_harness import PassCounter
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_decoders import VOCAB, completion_batch, tiny_decoder

LAYER = "model.layers.0"


def _prompts(seed: int, lengths: tuple[int, ...] = (6, 4, 5, 3)) -> dict[str, torch.Tensor]:
    """Left-padded prompts of the given lengths (the last real token is the last position)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def _right_padded(prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same prompts with their padding moved to the right."""
    ids, mask = prompts["input_ids"].clone(), prompts["attention_mask"].clone()
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        ids[row] = torch.cat([ids[row, -n:], torch.zeros(ids.shape[1] - n, dtype=ids.dtype)])
        mask[row] = torch.cat([torch.ones(n, dtype=mask.dtype), torch.zeros(ids.shape[1] - n, dtype=mask.dtype)])
    return {"input_ids": ids, "attention_mask": mask}


HARMFUL, HARMLESS = _prompts(1), _prompts(2, (5, 5, 2))


def _batch(seed: int = 3) -> dict[str, torch.Tensor]:
    return {**completion_batch("right", seed=seed), "harmful": torch.tensor([True, False, True])}


def _layer(model: torch.nn.Module, name: str = LAYER) -> torch.nn.Module:
    return dict(model.named_modules())[name]


def _hand_direction(model: torch.nn.Module, name: str = LAYER) -> torch.Tensor:
    """mean over harmful of h at the last prompt token − the same over harmless (left padding: the last column)."""
    seen = []
    handle = _layer(model, name).register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(**HARMFUL)
        model(**HARMLESS)
    handle.remove()
    return seen[0][:, -1].mean(0) - seen[1][:, -1].mean(0)


def _hand_grads(model, batch, direction, ablated_rows):
    """Grads of the loss with h ← h − r̂ r̂ᵀ h on ``ablated_rows`` at ``LAYER``, by an ordinary hook and backward."""
    unit = direction / direction.norm()
    rows = torch.zeros(batch["input_ids"].shape[0])
    rows[ablated_rows] = 1.0

    def ablate(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        moved = hidden - rows[:, None, None] * (hidden @ unit)[..., None] * unit
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    handle = _layer(model).register_forward_hook(ablate)
    model.zero_grad(set_to_none=True)
    model(**{k: v for k, v in batch.items() if k != "harmful"}).loss.backward()
    handle.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads(ours, theirs):
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_the_direction_is_the_difference_of_mean_last_token_states():
    model = tiny_decoder("llama")
    step = advfunc.refat(model, layers=LAYER, harmful=HARMFUL, harmless=HARMLESS)
    state = step.init(advfunc.params_of(model))
    torch.testing.assert_close(state["direction"][LAYER], _hand_direction(model), rtol=1e-5, atol=1e-6)
    # The last real token is found under either padding.
    right = advfunc.refat(model, layers=LAYER, harmful=_right_padded(HARMFUL), harmless=_right_padded(HARMLESS))
    torch.testing.assert_close(
        right.init(advfunc.params_of(model))["direction"][LAYER], state["direction"][LAYER], rtol=1e-5, atol=1e-6
    )


def test_grads_equal_the_hand_written_ablation_with_every_harmful_row_ablated():
    ours, twin = tiny_decoder("llama"), tiny_decoder("llama")
    step = advfunc.refat(ours, layers=LAYER, p=1.0, harmful=HARMFUL, harmless=HARMLESS)
    params = advfunc.params_of(ours)
    state = step.init(params)
    batch = _batch()
    grads, out, _ = step.update(params, batch, state)
    expected = _hand_grads(twin, batch, _hand_direction(twin), [0, 2])
    _assert_grads(grads, expected)
    direction = _hand_direction(twin)
    torch.testing.assert_close(out.delta, direction / direction.norm(), rtol=1e-5, atol=1e-6)


def test_the_rows_are_drawn_from_the_generator_with_probability_p():
    ours, twin = tiny_decoder("llama"), tiny_decoder("llama")
    generator = torch.Generator().manual_seed(5)
    step = advfunc.refat(ours, layers=LAYER, p=0.5, generator=generator, harmful=HARMFUL, harmless=HARMLESS)
    params = advfunc.params_of(ours)
    direction = step.init(params)["direction"]
    batch = _batch()
    draws = torch.Generator().manual_seed(5)
    for _ in range(4):
        grads, _ = step(params, batch, direction)
        picked = batch["harmful"] & (torch.rand(3, generator=draws) < 0.5)
        _assert_grads(grads, _hand_grads(twin, batch, _hand_direction(twin), picked.nonzero().flatten().tolist()))


def test_the_ablation_removes_the_component_along_r():
    model = tiny_decoder("llama")
    step = advfunc.refat(model, layers=LAYER, p=1.0, harmful=HARMFUL, harmless=HARMLESS)
    params = advfunc.params_of(model)
    direction = step.init(params)["direction"]
    unit = direction[LAYER] / direction[LAYER].norm()
    seen = []
    # The next layer's input is the ablated residual stream.
    handle = _layer(model, "model.layers.1").register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True
    )
    step(params, _batch(), direction)
    handle.remove()
    along = seen[0].detach() @ unit  # [B, L]
    real = _batch()["attention_mask"].bool()
    assert float(along[[0, 2]][real[[0, 2]]].abs().max()) < 1e-5
    assert float(along[1][real[1]].abs().max()) > 1e-2, "the harmless row must keep its component"


def test_p_zero_is_the_plain_step():
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), _batch()
    step = advfunc.refat(model, layers=LAYER, p=0.0, harmful=HARMFUL, harmless=HARMLESS)
    grads, out = step(params, batch, step.init(params)["direction"])
    plain_grads, plain_out = METHODS["none"].factory(model)(params, {k: v for k, v in batch.items() if k != "harmful"})
    for name, value in plain_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out.loss, plain_out.loss, rtol=0, atol=0)


def test_without_a_direction_the_step_computes_it_at_params():
    model = tiny_decoder("llama")
    step = advfunc.refat(model, layers=LAYER, p=1.0, harmful=HARMFUL, harmless=HARMLESS)
    params, batch = advfunc.params_of(model), _batch()
    given, _ = step(params, batch, step.init(params)["direction"])
    with PassCounter(model) as counter:
        computed, _ = step(params, batch)
    assert (counter.forwards, counter.backwards) == (3, 1)
    for name, value in given.items():
        torch.testing.assert_close(computed[name], value, rtol=0, atol=0, msg=name)


def test_the_direction_is_state_recomputed_every_n_optimizer_steps():
    model, twin = tiny_decoder("llama"), tiny_decoder("llama")
    step = advfunc.refat(model, layers=LAYER, p=1.0, every=2, harmful=HARMFUL, harmless=HARMLESS)
    params = advfunc.params_of(model)
    state = step.init(params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.5)
    direction = _hand_direction(twin)  # the twin's r, recomputed by hand on the same schedule
    for t in range(5):
        batch = _batch(seed=t)
        grads, _, state = step.update(params, batch, state)
        expected = _hand_grads(twin, batch, direction, [0, 2])
        _assert_grads(grads, expected)
        advfunc.set_grads(model, grads)
        optimizer.step()
        twin_optimizer.step()
        before = state["direction"][LAYER].clone()
        state = step.after_update(state, params)
        if (t + 1) % 2 == 0:
            direction = _hand_direction(twin)
            assert not torch.equal(state["direction"][LAYER], before), "r must follow the trained model"
        else:
            assert torch.equal(state["direction"][LAYER], before)
        torch.testing.assert_close(state["direction"][LAYER], direction, rtol=1e-4, atol=1e-6)


def test_cost_is_one_pass_per_step_and_two_forwards_per_direction():
    model = tiny_decoder("llama")
    step = advfunc.refat(model, layers=["model.layers.0", "model.layers.1"], harmful=HARMFUL, harmless=HARMLESS)
    params = advfunc.params_of(model)
    with PassCounter(model) as counter:
        state = step.init(params)
    assert (counter.forwards, counter.backwards) == (2, 0)
    with PassCounter(model) as counter:
        step.update(params, _batch(), state)
    assert (counter.forwards, counter.backwards) == (step.passes, 1) == (1, 1)
    assert step.config["every"] == 8 and step.config["direction_passes"] == 2 and step.carries_state


def test_refat_is_pure():
    model = tiny_decoder("llama")
    step = advfunc.refat(model, layers=LAYER, p=1.0, harmful=HARMFUL, harmless=HARMLESS)
    params, batch = advfunc.params_of(model), _batch()
    state = step.init(params)
    assert_step_is_pure(model, lambda: step.update(params, batch, state), params, batch)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"p": 1.5}, "p must be a probability"),
        ({"every": 0}, "every must be >= 1"),
        ({"layers": "model.layers.9"}, "unknown target 'model.layers.9'"),
        ({"harmful": [1, 2]}, "harmful must be a mapping"),
    ],
)
def test_bad_arguments_are_named(options, message):
    arguments = {"layers": LAYER, "harmful": HARMFUL, "harmless": HARMLESS, **options}
    with pytest.raises((ValueError, TypeError), match=message):
        advfunc.refat(tiny_decoder("llama"), **arguments)


def test_a_batch_without_the_harmful_flag_is_refused():
    model = tiny_decoder("llama")
    step = advfunc.refat(model, layers=LAYER, harmful=HARMFUL, harmless=HARMLESS)
    params = advfunc.params_of(model)
    state = step.init(params)
    with pytest.raises(ValueError, match=r"batch\['harmful'\]"):
        step.update(params, completion_batch("right"), state)
    with pytest.raises(ValueError, match="direction must be a dict"):
        step(params, _batch(), {"model.layers.1": state["direction"][LAYER]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: prompt sets built on the CPU")
def test_prompt_sets_built_on_the_cpu_follow_a_model_on_the_gpu():
    on_cpu = advfunc.refat(tiny_decoder("llama"), layers=LAYER, harmful=HARMFUL, harmless=HARMLESS)
    model = tiny_decoder("llama").cuda()
    on_gpu = advfunc.refat(model, layers=LAYER, harmful=HARMFUL, harmless=HARMLESS)
    direction = on_gpu.init(advfunc.params_of(model))["direction"][LAYER]
    reference = on_cpu.init(advfunc.params_of(tiny_decoder("llama")))["direction"][LAYER]
    assert direction.device.type == "cuda"
    torch.testing.assert_close(direction.cpu(), reference, rtol=1e-4, atol=1e-5)


def test_refat_is_registered_and_built_from_a_spec_with_its_prompt_sets():
    assert METHODS["refat"].batch_keys == (advfunc.HARMFUL,)
    model = tiny_decoder("llama")
    step = build_step(parse_method(f"refat:layers={LAYER},p=0.25,every=3"), model, harmful=HARMFUL, harmless=HARMLESS)
    assert step.method == "refat" and step.config["p"] == 0.25 and step.config["every"] == 3
    assert step.config["layers"] == [LAYER]
