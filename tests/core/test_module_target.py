"""A module's output as the target: δ added to a decoder layer's hidden states (the residual stream)."""

from __future__ import annotations

import pytest
import torch

import advfunc
from advfunc import attacks
from tests.support.tiny_decoders import DECODERS, HIDDEN, LAYER, completion_batch, tiny_decoder


def _hooked_loss(model, batch, name, delta):
    """The model's loss with ``name``'s output replaced by output + δ, by a hook written here."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        return model(**batch).loss
    finally:
        handle.remove()


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", DECODERS)
def test_adding_delta_at_a_layer_is_replacing_its_output(family, padding):
    model = tiny_decoder(family)
    params, batch = advfunc.params_of(model), completion_batch(padding, seed=2)
    name = LAYER[family]
    delta = torch.randn(3, 10, HIDDEN, generator=torch.Generator().manual_seed(0))
    real = batch["attention_mask"].unsqueeze(-1).float()
    loss_at = advfunc.perturbed_loss(model, target=name)
    ours = loss_at(params, batch, delta)
    expected = _hooked_loss(model, batch, name, delta * real)  # padding is never perturbed
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert abs(float(ours.detach()) - float(model(**batch).loss.detach())) > 1e-3
    # The gradient with respect to δ too.
    leaf = delta.clone().requires_grad_(True)
    (g_ours,) = torch.autograd.grad(loss_at(params, batch, leaf), leaf)
    leaf2 = delta.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_hooked_loss(model, batch, name, leaf2 * real), leaf2)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_a_module_returning_a_tuple_gets_delta_on_its_first_element():
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch("right", seed=4)
    name = "model.layers.0.self_attn"  # returns (attention output, attention weights)
    delta = torch.randn(3, 10, HIDDEN, generator=torch.Generator().manual_seed(1)) * batch["attention_mask"][..., None]
    ours = advfunc.perturbed_loss(model, target=name)(params, batch, delta)
    torch.testing.assert_close(ours, _hooked_loss(model, batch, name, delta), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", DECODERS)
def test_pgd_in_the_residual_stream(family):
    model = tiny_decoder(family)
    params, batch = advfunc.params_of(model), completion_batch("left", seed=6)
    name = LAYER[family]
    delta = attacks.pgd(model, epsilon=0.5, alpha=0.2, steps=3, target=name)(params, batch)
    assert delta.shape == (3, 10, HIDDEN)
    assert bool((delta[batch["attention_mask"] == 0] == 0).all())
    assert float(delta.flatten(1).norm(dim=1).max()) <= 0.5 * (1 + 1e-5)
    with torch.no_grad():
        assert float(_hooked_loss(model, batch, name, delta)) > float(model(**batch).loss)
    grads, out = advfunc.pgd(model, epsilon=0.5, alpha=0.2, steps=3, target=name)(params, batch)
    torch.testing.assert_close(out.delta, delta)
    torch.testing.assert_close(out.adv_loss, _hooked_loss(model, batch, name, delta).detach())
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


def test_several_modules_take_a_dict():
    model = tiny_decoder("llama")
    params, batch = advfunc.params_of(model), completion_batch("right")
    names = ["model.layers.0", "model.layers.1"]
    delta = attacks.pgd(model, epsilon=0.5, alpha=0.2, steps=2, target=names)(params, batch)
    assert sorted(delta) == names and all(d.shape == (3, 10, HIDDEN) for d in delta.values())
    zeros = {n: torch.zeros(3, 10, HIDDEN) for n in names}
    loss_at = advfunc.perturbed_loss(model, target=names)
    torch.testing.assert_close(loss_at(params, batch, zeros), model(**batch).loss)
    with pytest.raises(ValueError, match="modules"):
        loss_at(params, batch, {names[0]: zeros[names[0]]})


def test_bad_module_names_are_refused_with_candidates():
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.0.*model\.layers\.1"):
        attacks.pgd(model, target="model.layers.7")
    with pytest.raises(ValueError, match=r"target=\['model\.layers\.0\.mlp\.up_proj\.weight'\]"):
        attacks.pgd(model, target="model.layers.0.mlp.up_proj.weight")
    # The list form names parameters.
    attacks.pgd(model, target=["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match=r"hidden_size|returned"):
        advfunc.perturbed_loss(model, target="model.layers.0.mlp.up_proj")(
            advfunc.params_of(model), completion_batch("right"), torch.zeros(3, 10, HIDDEN)
        )
