"""FreeLB with every token in its own L2 ball: against a per-token reference loop, its bounds, and its limits."""

from __future__ import annotations

import copy

import pytest
import torch

import advfunc
from advfunc import attacks
from tests.support.classic_reference import classic_freelb_grads
from tests.support.parity import assert_grads_match
from tests.support.tiny_models import padded_batch, tiny_model


def reference_freelb_per_token(model, batch, steps, lr, init_mag, max_norm, generator):
    """FreeLB's loop with the step and the ball of each real token its own: (grads, δ_K); a Python loop over
    tokens, each normalised and projected alone, padding never moved."""
    model.zero_grad()
    embedding = model.get_input_embeddings()
    mask = batch["attention_mask"].float().unsqueeze(2)  # [B, L, 1]
    base = embedding(batch["input_ids"])
    hidden = base.shape[-1]
    noise = torch.zeros_like(base).uniform_(-1, 1, generator=generator) if init_mag > 0 else torch.zeros_like(base)
    delta = (noise * mask * init_mag / hidden**0.5).detach()
    for _ in range(steps):
        delta.requires_grad_()
        handle = embedding.register_forward_hook(lambda module, args, out, delta=delta: out + delta)
        try:
            (model(**batch).loss / steps).backward()
        finally:
            handle.remove()
        grad, moved = delta.grad.detach(), delta.detach().clone()
        for b in range(grad.shape[0]):
            for t in range(grad.shape[1]):
                if mask[b, t, 0] == 0:
                    continue
                moved[b, t] += lr * grad[b, t] / grad[b, t].norm().clamp(min=1e-8)
                if max_norm > 0 and moved[b, t].norm() > max_norm:
                    moved[b, t] *= max_norm / moved[b, t].norm()
        delta = moved
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, delta


@pytest.mark.parametrize(("init_mag", "max_norm"), [(0.0, 0.0), (1.0, 0.0), (1.0, 0.05)])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_grads_and_delta_match_the_per_token_reference(family, init_mag, max_norm):
    model = tiny_model(family)
    batch = padded_batch(family)
    expected, delta = reference_freelb_per_token(
        copy.deepcopy(model), batch, 3, 0.05, init_mag, max_norm, torch.Generator().manual_seed(3)
    )
    step = advfunc.freelb(
        model, steps=3, lr=0.05, init_mag=init_mag, max_norm=max_norm, per_token=True,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    grads, out = step(advfunc.params_of(model), batch)
    assert_grads_match(grads, expected, where=f"{family} per token")
    torch.testing.assert_close(out.delta, delta, rtol=1e-4, atol=1e-6)
    if max_norm > 0:  # the projection was active: some token sits on its sphere
        norms = out.delta.norm(dim=-1)[batch["attention_mask"].bool()]
        assert bool((norms <= max_norm * (1 + 1e-5)).all()) and bool((norms > max_norm * (1 - 1e-5)).any())
    assert bool((out.delta[~batch["attention_mask"].bool()] == 0).all()), "padding moved"


def test_one_token_sequences_make_per_token_and_per_example_the_same():
    model = tiny_model("bert")
    batch = {k: v[:, :1] for k, v in padded_batch("bert").items() if k != "labels"}
    batch["labels"] = padded_batch("bert")["labels"]
    per_example, per_token = (
        attacks.freelb(model, steps=2, lr=0.3, init_mag=0.5, max_norm=0.2, per_token=flag,
                       generator=torch.Generator().manual_seed(0))(advfunc.params_of(model), batch)
        for flag in (False, True)
    )  # fmt: skip
    torch.testing.assert_close(per_token, per_example)


def test_per_example_and_per_token_differ_on_longer_sequences_and_official_freelb_is_per_example():
    model = tiny_model("bert")
    batch = padded_batch("bert")
    _, official = classic_freelb_grads(copy.deepcopy(model), batch, 2, 0.3, 0.0, 0.2, "l2", None)
    per_example, per_token = (
        attacks.freelb(model, steps=2, lr=0.3, max_norm=0.2, per_token=flag)(advfunc.params_of(model), batch)
        for flag in (False, True)
    )
    torch.testing.assert_close(per_example, official, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(per_token, per_example, atol=1e-4)


def test_per_token_with_linf_is_refused_naming_both():
    with pytest.raises(ValueError, match="per_token=True with norm='linf'"):
        attacks.freelb(tiny_model("bert"), norm="linf", per_token=True)
