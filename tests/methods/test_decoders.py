"""Every method on tiny causal LMs (Llama, GPT-2, Qwen2) with completion-only labels, padded left and right.

Each step must return finite grads for exactly the trainable parameters, and its losses
must equal an independent forward of the model (the perturbation added by a hook
written here). The KL terms of VAT, SMART and R3F count the completion positions only:
they equal a KL summed position by position over the labelled tokens, and changing the
padding tokens leaves them, and the grads, unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import advfunc
from advfunc.methods import registry
from advfunc.methods.residual import HARMFUL
from tests.core.test_step_contract import _bad_calls
from tests.support.catalogue import CATALOGUE
from tests.support.tiny_decoders import DECODERS, LAYER, completion_batch, tiny_decoder, tiny_lora_decoder

PADDINGS = ("right", "left")


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def independent(model, batch, params=None, embeds=None, layer=None, edit=None):
    """(loss, logits) of one plain forward, δ added to the embedding output or a layer's output by a hook.

    ``edit``: (layer name, h -> h'), any change of that layer's output.
    """
    handles = []

    def editor(change):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (change(output[0]), *output[1:])
            return change(output)

        return hook

    if embeds is not None:
        handles.append(model.get_input_embeddings().register_forward_hook(editor(lambda h: h + embeds)))
    if layer is not None:
        handles.append(model.get_submodule(layer[0]).register_forward_hook(editor(lambda h: h + layer[1])))
    if edit is not None:
        handles.append(model.get_submodule(edit[0]).register_forward_hook(editor(edit[1])))
    kwargs = {k: v for k, v in batch.items() if k not in ("adv_labels", "harmful")}
    try:
        with torch.no_grad():
            out = functional_call(model, dict(params), (), kwargs) if params is not None else model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out.loss, out.logits


def hidden_at(model, batch, layer: str) -> torch.Tensor:
    """[B, L, H]: the output of ``layer`` in a plain forward of ``model``."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return seen[0].float()


def rerouting_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_ret, L_rr): the adapted layer's output against a twin base model's, token by token, written out."""
    family = model.config.model_type
    adapted = hidden_at(model, batch, LAYER[family])
    base = hidden_at(tiny_decoder(family), batch, LAYER[family])  # the same seed: the base weights
    distances, cosines = [], []
    for b, t in batch["attention_mask"].nonzero().tolist():
        if bool(batch[HARMFUL][b]):
            cosines.append(torch.relu(F.cosine_similarity(adapted[b, t], base[b, t], dim=0)))
        else:
            distances.append((adapted[b, t] - base[b, t]).norm())
    return torch.stack(distances).mean(), torch.stack(cosines).mean()


def completion(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: t counts when labels[t + 1] is not −100, written out position by position."""
    counted = torch.zeros(labels.shape, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            counted[b, t] = bool(labels[b, t + 1] != -100)
    return counted


def kl_by_position(p_logits, q_logits, counted: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Mean over the counted positions of KL(p_t ‖ q_t) (+ KL(q_t ‖ p_t)), one position at a time."""
    terms = []
    for b, t in counted.nonzero().tolist():
        log_p = torch.log_softmax(p_logits[b, t].double(), -1)
        log_q = torch.log_softmax(q_logits[b, t].double(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum()
        if symmetric:
            kl = kl + (log_q.exp() * (log_q - log_p)).sum()
        terms.append(kl)
    return torch.stack(terms).mean().float()


# Settings on a tiny decoder; targets stay in the embedding output where there is a choice
# (a tied embedding matrix refuses target="weight").
ON_A_DECODER = {
    "fgm": {"epsilon": 1.0, "target": "embeds"},
    "pgd": {"epsilon": 1.0, "alpha": 0.5, "steps": 2, "target": "embeds"},
    "freelb": {"steps": 1, "lr": 0.1},
    "free_at": {"epsilon": 0.05},
    "vat": {"epsilon": 1.0, "xi": 0.5},
    "smart": {"epsilon": 0.1, "step_size": 0.1, "noise_var": 0.05, "mu": 0.0},
    "r3f": {"sigma": 0.1},
    "awp": {"adv_lr": 1.0, "adv_eps": 0.05},
    "neftune": {"alpha": 5.0},
    "cat": {"epsilon": 0.5, "alpha": 0.1, "steps": 2},
    "lat": {"epsilon": 1.0, "alpha": 0.5, "steps": 2},
    "refat": {"p": 1.0},
    "rerouting": {},
    "ascc": {"steps": 1},
    "dne": {"steps": 1},
}
METHODS = sorted(set(CATALOGUE) - {"none"})  # a method missing from ON_A_DECODER fails by name
LAYERED = ("lat", "refat", "rerouting")  # a layer of each family


def run(method: str, model, params, batch):
    """(grads, out) of the catalogued ``method`` on ``batch`` with its decoder settings."""
    entry = CATALOGUE[method]
    overrides = dict(ON_A_DECODER[method])
    if method in LAYERED:
        overrides["layers"] = LAYER[model.config.model_type]
    if entry.seeded:
        overrides["generator"] = _seeded()
    return entry.call(entry.build(model, **overrides), params, batch)


def expected_losses(method: str, model, params, batch, out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out.loss, out.adv_loss) computed independently; None where the method has no second loss to check."""
    if method == "rerouting":
        return rerouting_losses(model, batch)
    clean, clean_logits = independent(model, batch)
    labels = batch["labels"]
    if method in ("fgm", "pgd", "cat"):
        return clean, independent(model, batch, embeds=out.delta)[0]
    if method in ("freelb", "free_at"):  # one pass at δ = 0
        return clean, clean
    if method == "dne":  # its last loss is at δ_{K-1}, a Dirichlet draw for K = 1; out.delta is δ_K
        return clean, None
    if method == "lat":
        return clean, independent(model, batch, layer=(LAYER[model.config.model_type], out.delta))[0]
    if method == "refat":  # p = 1: each harmful row loses its component along r̂ at every token
        rows = batch[HARMFUL].float()[:, None, None]
        ablated = independent(
            model,
            batch,
            edit=(LAYER[model.config.model_type], lambda h: h - rows * (h @ out.delta)[..., None] * out.delta),
        )[0]
        return ablated, ablated
    if method == "neftune":
        noised = independent(model, batch, embeds=out.delta)[0]
        return noised, noised
    if method == "awp":
        moved = {**params, **{name: params[name] + d for name, d in out.delta.items()}}
        return clean, independent(model, batch, params=moved)[0]
    perturbed_logits = independent(model, batch, embeds=out.delta)[1]
    return clean, kl_by_position(
        clean_logits, perturbed_logits, completion(labels), symmetric=method not in ("vat", "ascc")
    )


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_causal_lm_on_its_completion(method, family, padding):
    entry = CATALOGUE[method]
    model = tiny_lora_decoder(family).get_base_model() if entry.model == "lora decoder" else tiny_decoder(family)
    params = advfunc.params_of(model)
    keys = registry.METHODS[method].batch_keys
    batch = completion_batch(padding, adversary=advfunc.ADV_LABELS in keys)
    if not entry.labelled:
        del batch["labels"]
    if HARMFUL in keys:
        batch[HARMFUL] = torch.tensor([True, False, True])
    grads, out = run(method, model, params, batch)
    assert sorted(grads) == sorted(advfunc.trainable_names(model))
    for name, g in grads.items():
        assert g.shape == params[name].shape and bool(torch.isfinite(g).all()), name
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    assert not bool(out.skipped)
    loss, adv_loss = expected_losses(method, model, params, batch, out)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    if adv_loss is not None:
        torch.testing.assert_close(out.adv_loss, adv_loss, rtol=1e-4, atol=1e-7)


KL_METHODS = ("vat", "smart", "r3f")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method", KL_METHODS)
def test_kl_terms_ignore_prompt_and_padding(method, family, padding):
    model = tiny_decoder(family)
    params = advfunc.params_of(model)
    batch = completion_batch(padding, seed=3)
    grads, out = run(method, model, params, batch)
    # Over every position (prompt and padding too) the KL is another number: the check can fail.
    clean_logits = independent(model, batch)[1]
    at_delta = independent(model, batch, embeds=out.delta)[1]
    every = torch.ones(batch["labels"].shape, dtype=torch.bool)
    everywhere = kl_by_position(clean_logits, at_delta, every, symmetric=method not in ("vat", "ascc"))
    assert abs(float(everywhere) - float(out.adv_loss)) > 1e-3 * float(out.adv_loss)
    # Other tokens at the padding change the logits there, and nothing the step returns.
    g = torch.Generator().manual_seed(11)
    noise = torch.randint(3, 120, batch["input_ids"].shape, generator=g)
    repadded = {**batch, "input_ids": torch.where(batch["attention_mask"].bool(), batch["input_ids"], noise)}
    assert not torch.allclose(independent(model, repadded)[1], clean_logits)
    grads2, out2 = run(method, model, params, repadded)
    torch.testing.assert_close(out2.adv_loss, out.adv_loss, rtol=1e-5, atol=1e-8)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-7)


def test_an_unlabelled_batch_compares_every_real_token():
    model = tiny_decoder("llama")
    params = advfunc.params_of(model)
    batch = completion_batch("left", seed=5)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    _, out = advfunc.vat(model, epsilon=1.0, xi=0.5, generator=_seeded())(params, unlabelled)
    clean_logits = independent(model, unlabelled)[1]
    at_delta = independent(model, unlabelled, embeds=out.delta)[1]
    expected = kl_by_position(clean_logits, at_delta, unlabelled["attention_mask"].bool(), symmetric=False)
    torch.testing.assert_close(out.adv_loss, expected, rtol=1e-4, atol=1e-7)


# ---- the step contract of tests/core/test_step_contract.py, for the methods that need a decoder ----------------------

COMPLETION_METHODS = ("cat", "lat")


@pytest.mark.parametrize("method", COMPLETION_METHODS)
def test_cat_and_lat_validate_batch_and_params_like_every_step(method):
    model = tiny_decoder("llama")
    step = registry.factory_of(method)(model)
    batch = completion_batch("right", adversary=True)
    for case, (bad, params, named) in _bad_calls(batch, advfunc.params_of(model)).items():
        with pytest.raises(ValueError) as error:
            step(params, bad)
        assert named in str(error.value), f"{method}, {case}: {error.value}"


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(COMPLETION_METHODS),
    values=st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-30, 1e30, -1.0])),
        min_size=3,
        max_size=3,
    ),
    steps=st.integers(-1, 2),
)
def test_cat_and_lat_refuse_bad_numbers_by_name_or_give_finite_grads_or_skip(method, values, steps):
    names = ["epsilon", "alpha", "away"]
    options = {**dict(zip(names, values, strict=True)), "steps": steps}
    try:
        step = registry.factory_of(method)(_CONTRACT_MODEL, **options)
    except ValueError as error:
        assert any(name in str(error) for name in options), f"{method}{options}: {error}"
        return
    grads, out = step(advfunc.params_of(_CONTRACT_MODEL), completion_batch("left", adversary=True))
    assert all(bool(torch.isfinite(g).all()) for g in grads.values()) or bool(out.skipped)


_CONTRACT_MODEL = tiny_decoder("qwen2")
