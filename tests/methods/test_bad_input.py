"""Bad arguments and batches fail loudly, naming the value and the fix."""

from __future__ import annotations

import pytest
import torch

import advfunc
from tests.support.catalogue import CATALOGUE
from tests.support.method_harness import PassCounter
from tests.support.tiny_models import padded_batch, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("bert")


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda m: advfunc.fgm(m, epsilon=0), "epsilon"),
        (lambda m: advfunc.fgm(m, epsilon=-1.0), "epsilon"),
        (lambda m: advfunc.fgm(m, epsilon=float("inf")), "epsilon"),
        (lambda m: advfunc.pgd(m, alpha=0), "alpha"),
        (lambda m: advfunc.pgd(m, steps=0), "steps"),
        (lambda m: advfunc.pgd(m, epsilon=-0.5), "epsilon"),
        (lambda m: advfunc.freelb(m, lr=0), "lr"),
        (lambda m: advfunc.freelb(m, steps=0), "steps"),
        (lambda m: advfunc.freelb(m, norm="l1"), "norm"),
        (lambda m: advfunc.freelb(m, init_mag=-1.0), "init_mag"),
        (lambda m: advfunc.freelb(m, max_norm=-1.0), "max_norm"),
        (lambda m: advfunc.fgm(m, autocast=torch.float64), "autocast"),
    ],
)
def test_bad_hyper_parameter_is_a_value_error(model, build, match):
    with pytest.raises(ValueError, match=match):
        build(model)


@pytest.mark.parametrize("build", [lambda m: advfunc.pgd(m, steps=2.5), lambda m: advfunc.fgm(m, epsilon="1")])
def test_wrong_type_is_a_type_error(model, build):
    with pytest.raises(TypeError):
        build(model)


def test_unknown_target_lists_candidates(model):
    with pytest.raises(ValueError, match=r"unknown target 'word_embeddings'.*'weight', 'embeds'"):
        advfunc.fgm(model, target="word_embeddings")


def test_unknown_parameter_name_lists_candidates(model):
    with pytest.raises(ValueError, match=r"\['bert.embeddings.word.weight'\].*candidates: bert.embeddings"):
        advfunc.pgd(model, target=["bert.embeddings.word.weight"])


def test_freelb_takes_no_weight_target(model):
    with pytest.raises(TypeError):
        advfunc.freelb(model, target="weight")


def test_model_without_input_embeddings():
    with pytest.raises(ValueError, match="get_input_embeddings"):
        advfunc.fgm(torch.nn.Linear(3, 3))


def test_tied_embeddings_refuse_weight_target():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="target='embeds'"):
        advfunc.fgm(lm)
    advfunc.fgm(lm, target="embeds")  # the per-example target is fine


def _step(model):
    return advfunc.pgd(model, epsilon=0.5, alpha=0.3, steps=2)


def test_batch_not_a_mapping(model):
    with pytest.raises(TypeError, match="mapping"):
        _step(model)(advfunc.params_of(model), [torch.ones(2, 3)])


def test_batch_with_unknown_key_names_it(model):
    batch = dict(padded_batch("bert"), attention_maks=torch.ones(4, 12))
    with pytest.raises(TypeError, match="attention_maks"):
        _step(model)(advfunc.params_of(model), batch)


def test_batch_without_labels_or_loss_fn(model):
    batch = padded_batch("bert")
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        _step(model)(advfunc.params_of(model), batch)


def test_batch_without_input_ids(model):
    batch = padded_batch("bert")
    embeds = torch.zeros(4, 12, 32)
    del batch["input_ids"]
    with pytest.raises(ValueError, match="inputs_embeds"):
        _step(model)(advfunc.params_of(model), dict(batch, inputs_embeds=embeds))
    with pytest.raises(ValueError, match="input_ids"):
        _step(model)(advfunc.params_of(model), batch)


def test_token_ids_outside_vocabulary(model):
    batch = padded_batch("bert")
    batch["input_ids"][0, 0] = 10_000
    with pytest.raises(ValueError, match="vocabulary has 120 rows"):
        _step(model)(advfunc.params_of(model), batch)


def test_float_token_ids(model):
    batch = padded_batch("bert")
    batch["input_ids"] = batch["input_ids"].float()
    with pytest.raises(TypeError, match="integer"):
        _step(model)(advfunc.params_of(model), batch)


def test_mask_shape_mismatch(model):
    batch = dict(padded_batch("bert"), attention_mask=torch.ones(4, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        _step(model)(advfunc.params_of(model), batch)


def test_params_with_foreign_names_or_shapes(model):
    batch = padded_batch("bert")
    with pytest.raises(ValueError, match="names the model does not"):
        _step(model)({"other.weight": torch.zeros(2)}, batch)
    with pytest.raises(ValueError, match=r"classifier\.weight"):
        _step(model)({"classifier.weight": torch.zeros(2, 2)}, batch)


def test_frozen_model_has_nothing_to_train():
    model = tiny_model("bert")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        _step(model)(advfunc.params_of(model), padded_batch("bert"))


def test_loss_fn_replaces_outputs_loss(model):
    """A custom loss is honoured; it may read anything in the batch."""
    batch = padded_batch("bert")
    labels = batch.pop("labels")

    def loss_fn(outputs, call):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    grads, out = advfunc.fgm(model, loss_fn=loss_fn)(advfunc.params_of(model), batch)
    reference, ref_out = advfunc.fgm(model)(advfunc.params_of(model), dict(batch, labels=labels))
    torch.testing.assert_close(out.loss, ref_out.loss)
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name])


def test_bad_loss_scale(model):
    with pytest.raises(ValueError, match="loss_scale"):
        _step(model)(advfunc.params_of(model), padded_batch("bert"), loss_scale=0.0)


def _corrupt_labels(batch, value):
    labels = batch["labels"].clone()
    labels[labels != -100] = labels[labels != -100].clamp(max=0)  # in range for every model
    labels.view(-1)[(labels.view(-1) != -100).nonzero()[0]] = value
    return dict(batch, labels=labels)


CORRUPTIONS = {
    "labels int32": (lambda b, classes: dict(b, labels=b["labels"].int()), r"labels.*torch\.long.*int32"),
    "labels float": (lambda b, classes: dict(b, labels=b["labels"].float()), r"labels.*torch\.long"),
    "label past the classes": (lambda b, classes: _corrupt_labels(b, classes), r"labels.*\[{classes}\].*-100"),
    "negative label": (lambda b, classes: _corrupt_labels(b, -7), r"labels.*\[-7\].*-100"),
    "float ids": (lambda b, classes: dict(b, input_ids=b["input_ids"].float()), r"input_ids.*integer"),
    "id past the vocabulary": (
        lambda b, classes: dict(b, input_ids=b["input_ids"] + 10_000),
        r"input_ids.*vocabulary has 120 rows",
    ),
}


def _applies(name: str, corruption: str) -> bool:
    """A label corruption needs a batch with labels (rerouting's has none)."""
    return CATALOGUE[name].labelled or "label" not in corruption


@pytest.mark.parametrize(
    ("name", "corruption"), [(n, c) for n in sorted(CATALOGUE) for c in sorted(CORRUPTIONS) if _applies(n, c)]
)
def test_every_method_refuses_a_bad_batch_naming_the_key_before_any_pass(name, corruption):
    entry = CATALOGUE[name]
    model = entry.make_model()
    classes = model.config.num_labels if entry.model == "classifier" else model.config.vocab_size
    corrupt, match = CORRUPTIONS[corruption]
    batch = corrupt(entry.make_batch(), classes)
    step = entry.build(model)
    params = advfunc.params_of(model)
    state = entry.init(step, params)
    with PassCounter(model) as count, pytest.raises(ValueError, match=match.replace("{classes}", str(classes))):
        entry.call(step, params, batch, state)
    assert count.forwards == 0


@pytest.mark.parametrize("name", sorted(n for n, entry in CATALOGUE.items() if entry.labelled))
def test_every_method_skips_a_batch_whose_labels_are_all_ignored(name):
    """Nothing to score (every label −100): a finite loss of 0 and ``skipped``, never a silent NaN.

    CAT and LAT read the adversary's completion after the desired one; with no desired
    completion there is none to follow, and the batch is refused naming ``adv_labels``.
    """
    entry = CATALOGUE[name]
    model = entry.make_model()
    batch = entry.make_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    step, params = entry.build(model), advfunc.params_of(model)
    if advfunc.ADV_LABELS in batch:
        with pytest.raises(ValueError, match="adv_labels"):
            entry.call(step, params, batch)
        return
    grads, out = entry.call(step, params, batch)
    assert bool(out.skipped)
    assert out.loss.item() == 0.0 and out.adv_loss.item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_awp_checks_the_token_ids_though_it_perturbs_weights(model):
    batch = padded_batch("bert")
    batch["input_ids"][1, 2] = 120
    with pytest.raises(ValueError, match=r"input_ids.*\[0, 120\].*vocabulary has 120 rows"):
        advfunc.awp(model)(advfunc.params_of(model), batch)


def test_regression_and_multi_label_heads_take_float_targets():
    regression = tiny_model("bert", num_labels=1)
    batch = padded_batch("bert")
    with pytest.raises(ValueError, match=r"labels.*float targets"):
        advfunc.fgm(regression)(advfunc.params_of(regression), batch)
    _, out = advfunc.fgm(regression)(advfunc.params_of(regression), dict(batch, labels=batch["labels"].float()))
    assert torch.isfinite(out.loss) and not bool(out.skipped)
    multi = tiny_model("bert")
    targets = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"labels.*torch\.long.*shape \[batch, 3\]"):
        advfunc.fgm(multi)(advfunc.params_of(multi), dict(batch, labels=torch.zeros(4, 2)))
    _, out = advfunc.fgm(multi)(advfunc.params_of(multi), dict(batch, labels=targets))
    assert torch.isfinite(out.loss) and multi.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match=r"labels.*float targets of shape \[batch, 3\]"):
        advfunc.fgm(multi)(advfunc.params_of(multi), batch)  # the head now reads float targets


@pytest.mark.parametrize(
    "corruption", ["labels int32", "label past the classes", "float ids", "id past the vocabulary"]
)
@pytest.mark.parametrize("name", sorted(n for n in CATALOGUE if hasattr(advfunc.attacks, n)))  # ReFAT, rerouting: none
def test_every_attack_refuses_a_bad_batch_naming_the_key_before_any_pass(name, corruption):
    """The attacks run the steps' batch check: the same refusal, whether called alone or inside a step."""
    entry = CATALOGUE[name]
    model = entry.make_model()
    classes = model.config.num_labels if entry.model == "classifier" else model.config.vocab_size
    corrupt, match = CORRUPTIONS[corruption]
    batch = corrupt(entry.make_batch(), classes)
    attack = getattr(advfunc.attacks, name)(model, **entry.needs(model))
    with PassCounter(model) as count, pytest.raises(ValueError, match=match.replace("{classes}", str(classes))):
        attack(advfunc.params_of(model), batch)
    assert count.forwards == 0
