"""The method registry: spec parsing, and every registered method driven through the training loop."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from transformers import TrainingArguments, default_data_collator

import advfunc
from advfunc.hf import AdversarialTrainer
from advfunc.methods import registry
from tests.support.catalogue import tiny_synonyms
from tests.support.tiny_models import padded_batch, tiny_model


def test_spec_parsing_and_labels():
    spec = registry.parse_method(" pgd : epsilon=0.5, steps=2 ")
    assert spec.name == "pgd" and spec.options == {"epsilon": 0.5, "steps": 2}
    assert isinstance(spec.options["steps"], int) and spec.label == "pgd(epsilon=0.5,steps=2)"
    assert registry.parse_method("fgm:target=embeds").options == {"target": "embeds"}
    assert registry.parse_method("none").label == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "unknown method 'nope'"),
        ("pgd:radius=1", "has no hyper-parameter 'radius'"),
        ("pgd:steps=two", "steps must be an integer"),
        ("pgd:epsilon", "is not key=value"),
        ("freelb:lr=fast", "lr must be a number"),
    ],
)
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(registry.MethodError, match=message):
        registry.parse_method(text)


def test_every_method_the_loop_offers_is_registered():
    names = registry.available()
    assert {"none", "fgm", "pgd", "freelb"} <= set(names)
    for name in names:
        for hyper in registry.hyperparameters(name).values():
            assert hyper.kind in (bool, int, float, str)


def test_smart_beta_and_free_at_replays_are_spec_hyperparameters():
    """SMART's teacher decay and free AT's m are factory arguments, spelt in the spec like any other."""
    assert registry.hyperparameters("smart")["beta"].default == 0.99
    assert registry.hyperparameters("free_at")["replays"].default == 3
    spec = registry.parse_method("smart:beta=0.999")
    assert spec.options == {"beta": 0.999} and spec.label == "smart(beta=0.999)"
    assert registry.parse_method("free_at:replays=2").options == {"replays": 2}
    assert registry.parse_method("free_at").identity == registry.parse_method("free_at:replays=3").identity
    assert registry.parse_method("smart").identity != registry.parse_method("smart:beta=0.9").identity


# Small perturbations: the point is that each method runs and trains, not robustness.
SPECS = {
    "none": "none",
    "fgm": "fgm:epsilon=0.1",
    "pgd": "pgd:epsilon=0.1,alpha=0.05,steps=2",
    "freelb": "freelb:steps=2,lr=0.01",
    "neftune": "neftune:alpha=5",
    "vat": "vat:epsilon=0.1",
    "r3f": "r3f",
    "awp": "awp",
    "smart": "smart:beta=0.9",
    "free_at": "free_at:replays=2",
    # The synonym table is no scalar option: these two take their factory with it.
    "ascc": partial(advfunc.ascc, synonyms=tiny_synonyms(), steps=1),
    "dne": partial(advfunc.dne, synonyms=tiny_synonyms(), steps=1),
}


# CAT and LAT train a causal LM on an adversary's completion (tests/methods/test_cat.py, tests/methods/test_lat.py).
@pytest.mark.parametrize("name", [n for n, m in registry.METHODS.items() if not m.batch_keys])
def test_each_method_trains_through_the_trainer(name, tmp_path):
    model = tiny_model("bert", num_labels=2)
    start = copy.deepcopy(model)
    batch = padded_batch("bert", batch=12, seed=0, num_labels=2)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(12)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,
    )
    trainer = AdversarialTrainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator, step_factory=SPECS[name]
    )
    trainer.train()
    assert trainer.state.global_step == 3 * (2 if name == "free_at" else 1)
    with torch.no_grad():
        moved = sum(float((p - q).abs().sum()) for p, q in zip(model.parameters(), start.parameters(), strict=True))
    assert moved > 0


def test_the_test_catalogue_has_every_registered_method():
    from tests.support.catalogue import CATALOGUE

    assert sorted(CATALOGUE) == sorted(registry.METHODS)
    for name, entry in CATALOGUE.items():
        assert entry.factory is registry.METHODS[name].factory
