"""Bad input to the word-level attacks is refused before any search, naming the value and the fix."""

from __future__ import annotations

import pytest
import torch

from advfunc.words.synonym_attack import SynonymAttackConfig, attack_texts
from tests.words.test_pwws import SYNONYMS, WEIGHTS, Linear, Thesaurus, letters

CONFIG = SynonymAttackConfig(similarity=-1.0)


def _attack(texts, labels, classify=None, encode=letters, config=CONFIG):
    return attack_texts(texts, labels, classify or Linear(WEIGHTS), encode, Thesaurus(SYNONYMS), config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("texts", "labels", "error", "match"),
    [
        ("alpha beta", [1] * 10, TypeError, r"one str; pass \[text\]"),  # a str is a sequence of characters
        ([None], [1], TypeError, r"texts\[0\] must be a str, got NoneType"),
        ([b"alpha beta"], [1], TypeError, r"texts\[0\] must be a str, got bytes"),
        (["alpha beta"], [1.5], TypeError, r"labels\[0\] must be a class id.*1\.5"),
        (["alpha beta"], [True], TypeError, r"labels\[0\] must be a class id.*True"),
        (["alpha beta"], [-1], ValueError, r"labels\[0\] must be a class id >= 0, got -1"),
        (["alpha beta"], [5], ValueError, r"label 5 of the text 'alpha beta' is not one of the classifier's 2 classes"),
    ],
)
def test_bad_texts_and_labels_are_refused(texts, labels, error, match):
    model = Linear(WEIGHTS)
    with pytest.raises(error, match=match):
        _attack(texts, labels, model)
    assert len(model.texts) <= 1  # at most the one query that tells the classes apart


def test_integer_scalars_are_labels():
    assert [r.status for r in _attack(["alpha beta"], torch.tensor([1]))] == ["failed"]


@pytest.mark.parametrize(
    ("classify", "encode", "match"),
    [
        (lambda texts: torch.full((len(texts) + 1, 2), 0.5), letters, r"classify returned \(2, 2\) for 1 texts"),
        (lambda texts: torch.full((len(texts),), 0.5), letters, r"classify returned \(1,\) for 1 texts"),
        (lambda texts: [[0.5, 0.5]] * len(texts), letters, r"classify returned list for 1 texts"),
        (
            lambda texts: torch.full((len(texts), 2), float("nan")),
            letters,
            r"classify returned 2 values.*finite: False",
        ),
        (lambda texts: torch.ones(len(texts), 1), letters, r"classify returned 1 values per text"),
        (None, lambda texts: torch.ones(1, 3), r"encode returned \(1, 3\) for 3 texts"),
    ],
)
def test_a_classifier_or_encoder_answering_out_of_shape_is_named(classify, encode, match):
    with pytest.raises(ValueError, match=match):
        _attack(["alpha beta"], [1], classify, encode, SynonymAttackConfig(similarity=0.5))


@pytest.mark.parametrize("field", ["max_candidates", "query_budget", "batch_size", "texts_per_batch"])
@pytest.mark.parametrize("value", [2.5, True, "3"])
def test_count_settings_must_be_ints(field, value):
    with pytest.raises(TypeError, match=rf"{field} must be an int >= 1, got {value!r}"):
        SynonymAttackConfig(**{field: value}).check()


def test_hotflip_refuses_non_integer_budgets_and_unlabelled_examples():
    import advfunc
    from advfunc.core.model import PerturbedModel
    from advfunc.words.hotflip import WordVocabulary, hotflip
    from tests.support.tiny_models import tiny_model

    model = tiny_model("bert").eval()
    size = model.get_input_embeddings().weight.shape[0]
    vocabulary = WordVocabulary(torch.ones(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool))
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]]), "labels": torch.tensor([1, 0])}
    params, perturbed = advfunc.params_of(model), PerturbedModel(model)
    for budget in (2.5, True, "2", -1):
        with pytest.raises(TypeError, match=rf"budget must be an int >= 0.*got {budget!r}"):
            hotflip(perturbed, params, batch, vocabulary, budget)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"neighbours must be an int >= 1, got 0\.5"):
        hotflip(perturbed, params, batch, vocabulary, 1, neighbours=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"one class id >= 0 per example.*\[-100, 0\]"):
        hotflip(perturbed, params, {**batch, "labels": torch.tensor([-100, 0])}, vocabulary, 1)


def test_accented_words_stay_whole_and_are_never_half_replaced():
    from advfunc.words.synonym_attack import word_spans

    text = "a naïve café, über-cool Zoë and cafe\u0301 story"
    assert [text[s:e] for s, e in word_spans(text)] == [
        "a", "naïve", "café", "über-cool", "Zoë", "and", "cafe\u0301", "story",
    ]  # fmt: skip
    # "na" is a WordNet word (sodium): a fragment of "naïve" must never be looked up or replaced.
    thesaurus = Thesaurus({"na": ["sodium"], "caf": ["cafeteria"], "story": ["tale"]})
    model = Linear({"story": 2.0, "tale": -5.0, "sodium": -5.0, "cafeteria": -5.0})
    (result,) = attack_texts([text], [1], model, letters, thesaurus, CONFIG)  # type: ignore[arg-type]
    assert result.status == "succeeded" and result.adversarial == text.replace("story", "tale")
    assert not [t for t in model.texts if "sodium" in t or "cafeteria" in t]
