"""``advfunc.perturbed_outputs``: the model's outputs at δ, checked against the model's own forward."""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc import attacks
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_models import padded_batch, tiny_model


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_outputs_at_delta_are_the_forward_with_delta_added_to_the_embeddings(family):
    model = tiny_model(family)
    model.eval()
    params, batch = advfunc.params_of(model), padded_batch(family)
    outputs_at = advfunc.perturbed_outputs(model, "embeds")
    mask = batch["attention_mask"].bool()
    hidden = model.get_input_embeddings().weight.shape[1]
    delta = torch.randn(*batch["input_ids"].shape, hidden, generator=torch.Generator().manual_seed(0))
    delta = delta * mask[..., None]  # the target never perturbs padding
    with torch.no_grad():
        clean = model(**batch)
        handle = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out + delta)
        try:
            expected = model(**batch)  # the oracle: δ added by a hook on the model's own forward
        finally:
            handle.remove()
        found = outputs_at(params, batch, delta)
        torch.testing.assert_close(found.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(found.loss, expected.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outputs_at(params, batch, None).logits, clean.logits)
        assert not torch.allclose(found.logits, clean.logits), "δ changed nothing"


def test_outputs_agree_with_perturbed_loss_and_read_an_attacks_delta():
    model = tiny_model("bert")
    params, batch = advfunc.params_of(model), padded_batch("bert")
    attack = attacks.pgd(model, epsilon=0.5, alpha=0.2, steps=3, target="embeds", compile=False)
    delta = attack(params, batch)
    outputs_at = advfunc.perturbed_outputs(model, "embeds")
    with torch.no_grad():
        attacked = outputs_at(params, batch, delta).loss
        torch.testing.assert_close(attacked, advfunc.perturbed_loss(model, "embeds")(params, batch, delta))
        assert float(attacked) > float(outputs_at(params, batch, None).loss), "the attack raised the loss"
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    assert outputs_at(params, unlabelled, delta).logits.shape[0] == batch["input_ids"].shape[0]
    assert_step_is_pure(model, lambda: outputs_at(params, batch, delta), params, batch)


def test_a_delta_of_the_wrong_shape_is_refused():
    model = tiny_model("bert")
    params, batch = advfunc.params_of(model), padded_batch("bert")
    length = batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match="delta has shape"):
        advfunc.perturbed_outputs(model, "embeds")(params, batch, torch.zeros(4, length - 1, 32))
