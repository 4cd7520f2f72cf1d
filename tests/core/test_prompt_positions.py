"""Token positions: a per-token perturbation restricted to the prompt, or to a mask the batch carries."""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc import attacks
from tests.support.tiny_decoders import LAYER, completion_batch, prompt_of, tiny_decoder


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("where", ["embeds", "layer"])
def test_a_prompt_target_is_exactly_zero_outside_the_prompt(where, padding):
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch(padding, seed=1)
    # The first layer: a prompt token there reaches the completion through the second layer's attention.
    target = ("embeds" if where == "embeds" else "model.layers.0") + "@prompt"
    delta = attacks.pgd(model, epsilon=1.0, alpha=0.4, steps=3, target=target)(params, batch)
    prompt = prompt_of(batch)
    assert bool((delta[~prompt] == 0).all())
    assert bool((delta[prompt].norm(dim=-1) > 0).all())
    # Without the restriction the completion is perturbed too: the check can fail.
    free = attacks.pgd(model, epsilon=1.0, alpha=0.4, steps=3, target=target.removesuffix("@prompt"))(params, batch)
    assert float(free[~prompt & batch["attention_mask"].bool()].abs().max()) > 0
    _, out = advfunc.pgd(model, epsilon=1.0, alpha=0.4, steps=3, target=target)(params, batch)
    torch.testing.assert_close(out.delta, delta)


def test_the_batch_mask_restricts_every_embedding_method_and_never_reaches_the_model():
    # The model's forward takes no such key: a batch that reached it would raise.
    model = tiny_decoder("gpt2")
    params, batch = advfunc.params_of(model), completion_batch("left", seed=2)
    allowed = torch.zeros(3, 10, dtype=torch.long)
    allowed[:, 5:8] = 1
    masked = {**batch, advfunc.PERTURB_MASK: allowed}
    keep = (allowed.bool() & batch["attention_mask"].bool()).unsqueeze(-1)
    g = torch.Generator
    deltas = {
        "pgd": attacks.pgd(model, epsilon=1.0, alpha=0.4, steps=2, target="embeds")(params, masked),
        "layer": attacks.pgd(model, epsilon=1.0, alpha=0.4, steps=2, target=LAYER["gpt2"])(params, masked),
        "vat": attacks.vat(model, generator=g().manual_seed(0))(params, masked),
        "smart": attacks.smart(model, noise_var=0.1, generator=g().manual_seed(0))(params, masked),
        "r3f": attacks.r3f(model, sigma=0.1, generator=g().manual_seed(0))(params, masked),
        "neftune": attacks.neftune(model, generator=g().manual_seed(0))(params, masked),
        "freelb": attacks.freelb(model, steps=2, init_mag=0.5, generator=g().manual_seed(0))(params, masked),
        "free_at": attacks.free_at(model, epsilon=0.1)(params, masked),
    }
    for name, delta in deltas.items():
        assert bool((delta * ~keep == 0).all()), name
        assert float((delta * keep).abs().max()) > 0, name
    _, out = advfunc.r3f(model, sigma=0.1, generator=g().manual_seed(0))(params, masked)
    assert bool((out.delta * ~keep == 0).all())


def test_a_target_without_positions_refuses_the_mask_and_the_prompt():
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch("right")
    masked = {**batch, advfunc.PERTURB_MASK: torch.ones(3, 10, dtype=torch.long)}
    with pytest.raises(ValueError, match="token positions"):
        attacks.pgd(model, target="weight")(params, masked)
    with pytest.raises(ValueError, match="embeds@prompt"):
        attacks.pgd(model, target="weight@prompt")
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="labels"):
        attacks.pgd(model, target="embeds@prompt", loss_fn=lambda o, b: o.logits.sum())(params, unlabelled)
    with pytest.raises(ValueError, match=advfunc.PERTURB_MASK):
        attacks.pgd(model, target="embeds")(params, {**batch, advfunc.PERTURB_MASK: torch.ones(3, 4)})


def test_a_row_without_a_prompt_is_refused_not_left_unperturbed():
    # Labels copied from input_ids (no −100 at the prompt) would leave a prompt target nothing to perturb.
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch("right", seed=3, adversary=True)
    labels = batch["labels"].clone()
    labels[1] = torch.where(batch["attention_mask"][1].bool(), batch["input_ids"][1], -100)
    unprompted = {**batch, "labels": labels}
    with pytest.raises(ValueError, match=r"row 1 .*prompt"):
        advfunc.cat(model, steps=1)(params, unprompted)
    unprompted.pop("adv_labels")
    with pytest.raises(ValueError, match=r"row 1 .*prompt"):
        attacks.pgd(model, epsilon=1.0, alpha=0.4, steps=1, target="model.layers.0@prompt")(params, unprompted)
